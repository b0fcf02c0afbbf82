"""Time the trainer's step against the reference recipe: ``python -m minidit.bench``.

    python -m minidit.bench --quick                # CPU smoke run (< 1 min idle): ref vs minidit's row
    python -m minidit.bench                        # CUDA: DiT-XL/2 at 256 px, ref vs bf16+sdpa+compile
    python -m minidit.bench --configs ref,fp32,bf16,bf16+compile,ref-2023 --json out.json --markdown out.md

Every row times ``minidit.train.train_step``, the function the trainer calls (forward, the hybrid loss,
backward, AdamW, EMA), on random latents and labels, with timesteps, noise and label drops drawn on the
device. The baseline row ``ref`` is the reference recipe built from that same step (``reference_row``):
fp32 (TF32 on a GPU), timm's fused SDPA attention, eager, torch's default AdamW over every parameter, the
model's own label dropout and a Python-loop EMA over every parameter (``reference_ema_update``). "× ref" is
a row's images/s over ``ref``'s in the same run; ``ref-2023`` (math attention, as in 2023) is an extra row.
Other rows are ``+``-joined changes run with the trainer's optimizer and EMA: ``fp32|bf16|fp16``,
``sdpa|math|flash``, ``compile``, ``ckpt``, ``opt=plain|foreach|fused``, ``ema=loop|foreach``, ``minidit``
(the device's defaults). Method, noise rule and results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import train
from .diffusion import create_diffusion
from .errors import ArgumentParser, UserError, positive_int, run_cli
from .fileio import write_json, write_text
from .model import MODELS, create_model
from .runtime import autocast_dtype, resolve_device
from .stats import model_stats

PRECISIONS = ("fp32", "bf16", "fp16")
LR, EMA_DECAY = 1e-4, 0.9999  # the reference's
#: Timings are noise when their interquartile range exceeds this fraction of their median (quiet: a few %).
NOISY_SPREAD = 0.25
#: Dense tensor-core peak TFLOP/s (bf16, fp16, fp32 = TF32 where the GPU has it) from NVIDIA's datasheets,
#: without 2:4 sparsity; the first pattern found in ``torch.cuda.get_device_name()`` wins.
GPU_PEAKS = {
    r"H100.*PCIE": (756, 756, 378), r"H[12]00.*NVL": (835, 835, 418), r"GH200|\bH[12]00\b": (989, 989, 494),
    r"\bA100\b": (312, 312, 156), r"\bL40S\b": (362, 362, 183), r"\bL40\b": (181, 181, 90.5),
    r"\bL4\b": (121, 121, 60), r"\bA10G?\b": (125, 125, 62.5), r"RTX 4090": (165, 165, 82.6),
    r"\bV100": (None, 125, 15.7), r"\bT4\b": (None, 65, 8.1),
}  # fmt: skip


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The peak TFLOP/s of a GPU's matmuls in ``precision`` (None: a CPU, an unknown GPU, no bf16)."""
    peaks = next((p for pat, p in GPU_PEAKS.items() if re.search(pat, device_name, re.IGNORECASE)), None)
    return None if peaks is None else peaks[("bf16", "fp16", "fp32").index(precision)]


# -- rows: the reference recipe and minidit's configurations ---------------------------------------------
@dataclass(frozen=True)
class RowConfig:
    name: str
    reference: bool = False  # the reference recipe: all parameters to AdamW, the model's own label dropout
    precision: str = "fp32"
    attn: str = "sdpa"
    compile: bool = False
    grad_checkpointing: bool = False
    optimizer: str = "plain"  # AdamW: plain (per-tensor loop) | foreach | fused
    ema: str = "loop"  # loop: reference_ema_update | foreach: minidit.train.update_ema


ROW_LABELS = {"ref": "ref (reference)", "ref-2023": "ref-2023 (extra: 2023 math attention)"}


def reference_row(device: torch.device, name: str = "ref") -> RowConfig:
    """The reference recipe (``name="ref-2023"``: with math attention). torch's default AdamW is the
    per-tensor loop on a CPU (it has no foreach kernels there) and foreach on CUDA."""
    opt = "foreach" if device.type == "cuda" else "plain"
    return RowConfig(name, reference=True, attn="math" if name == "ref-2023" else "sdpa", optimizer=opt)


def parse_config(text: str, device: torch.device) -> RowConfig:
    """``"bf16+sdpa+compile"`` -> a row with the trainer's optimizer and EMA and those changes."""
    name, cuda = text.strip(), device.type == "cuda"
    if name in ROW_LABELS:
        return reference_row(device, name)
    tokens = {"compile": {"compile": True}, "ckpt": {"grad_checkpointing": True}, "flash": {"attn": "flash_attn"},
              "minidit": {"precision": "bf16" if cuda else "fp32", "attn": "sdpa", "compile": cuda}}  # fmt: skip
    tokens |= {p: {"precision": p} for p in PRECISIONS} | {a: {"attn": a} for a in ("sdpa", "math", "flash_attn")}
    tokens |= {f"opt={o}": {"optimizer": o} for o in ("plain", "foreach", "fused")}
    tokens |= {f"ema={e}": {"ema": e} for e in ("loop", "foreach")}
    row = RowConfig(name, optimizer=train.optimizer_kind(device), ema="foreach")
    for token in name.split("+"):
        if token.strip() not in tokens:
            raise UserError(
                f"--configs: unknown item {token.strip()!r} in {name!r}; use ref, ref-2023 or '+'-joined "
                "fp32|bf16|fp16, sdpa|math|flash, compile, ckpt, opt=plain|foreach|fused, ema=loop|foreach, minidit"
            )
        row = replace(row, **tokens[token.strip()])
    return row


def parse_configs(text: str, device: torch.device) -> list[RowConfig]:
    """A comma-separated sweep -> rows, ``ref`` first (added when missing), duplicates dropped."""
    rows = [reference_row(device)]
    for item in text.split(","):
        if item.strip() and (row := parse_config(item, device)) not in rows:
            rows.append(row)
    return rows


def skip_reason(row: RowConfig, device: torch.device, quick: bool) -> str | None:
    """Why ``row`` cannot run here (None: it can): a GPU feature is a skipped row, never a crash."""
    flash = row.attn == "flash_attn"
    if device.type != "cuda":
        if row.precision != "fp32" or flash:
            return f"{'flash_attn' if flash else row.precision} is benchmarked on CUDA only"
        return "torch.compile takes minutes on a CPU: not in --quick" if row.compile and quick else None
    if row.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16"
    if not flash or row.precision == "fp32":
        return "flash_attn needs bf16 or fp16" if flash else None
    try:  # the optional package, imported for a flash row only (a broken build would silently fall back to sdpa)
        from flash_attn import flash_attn_func  # noqa: F401
    except Exception:
        return "the flash-attn package is not installed or does not import"
    return None


# -- the step of one row: the trainer's train_step ---------------------------------------------------------
@torch.no_grad()
def reference_ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The reference trainer's EMA: a Python loop, one ``mul_`` and one ``add_`` per parameter, the frozen
    ``pos_embed`` included (minidit's ``update_ema`` is one ``torch._foreach_lerp_`` over the trainable ones)."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.data, alpha=1 - decay)


class TrainStep:
    """One row's model, EMA, optimizer and batch; ``step()`` is one ``minidit.train.train_step``."""

    def __init__(self, spec: argparse.Namespace, row: RowConfig, device: torch.device):
        self.row, self.device = row, device
        torch.manual_seed(0)
        with torch.device(device):
            self.model = create_model(
                spec.model, input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes,
                attn_backend=row.attn, grad_checkpointing=row.grad_checkpointing,
            ).train()  # fmt: skip
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # the reference hands AdamW every parameter (pos_embed has no grad: skipped), the trainer the trainable ones
        params = [p for p in self.model.parameters() if p.requires_grad or row.reference]
        self.opt = train.make_optimizer(params, lr=LR, weight_decay=0.0, device=device, kind=row.optimizer)
        self.forward = torch.compile(self.model) if row.compile else self.model
        self.scaler = torch.amp.GradScaler(device.type) if row.precision == "fp16" else None
        self.ema_update = reference_ema_update if row.ema == "loop" else train.update_ema
        self.diffusion = create_diffusion("")
        g = torch.Generator(device).manual_seed(0)
        self.x = torch.randn(spec.batch_size, spec.in_channels, spec.input_size, spec.input_size, generator=g,
                             device=device)  # fmt: skip
        self.y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g, device=device)

    def batch(self) -> tuple[torch.Tensor, ...]:
        """(x0, y, t, noise, drop) on the device; drop None for the reference (the model's own coin flips)."""
        B, dev = self.x.shape[0], self.device
        t = self.diffusion.sample_timesteps(B, device=dev)  # the trainer's draw of t
        drop = None if self.row.reference else (torch.rand(B, device=dev) < self.model.y_embedder.dropout_prob).long()
        return self.x, self.y, t, torch.randn_like(self.x), drop

    def step(self) -> torch.Tensor:
        return train.train_step(
            self.forward, self.model, self.ema, self.opt, self.diffusion, [self.batch()], accum=1, lr=LR,
            ema_decay=EMA_DECAY, amp_dtype=autocast_dtype(self.row.precision, self.device), scaler=self.scaler,
            ema_update=self.ema_update,
        )  # fmt: skip


# -- timing and noise -------------------------------------------------------------------------------------
def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, min, max, quartiles, n and spread (interquartile range / median) of timings in seconds."""
    if not samples:
        raise ValueError("no timings to summarize")
    xs = sorted(samples)

    def q(f: float) -> float:  # linear interpolation between order statistics
        lo = int(pos := f * (len(xs) - 1))
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    median, q1, q3 = q(0.5), q(0.25), q(0.75)
    spread = (q3 - q1) / median if median > 0 else 0.0
    return {"median": median, "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "n": len(xs), "spread": spread}


def time_per_call(fn: Callable[[], Any], iters: int, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds per call over ``iters`` back-to-back calls (on a GPU: from idle to the last kernel's end)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = clock()
    for _ in range(iters):
        fn()
    sync()
    return (clock() - t0) / iters


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_ref`` = a row's images/s / the ``ref`` row's, None where either has no timings."""
    ref = next((r for r in rows if r["name"] == "ref" and r["status"] == "ok"), None)
    for res in rows:
        res["x_ref"] = res["images_per_s"] / ref["images_per_s"] if ref and res["status"] == "ok" else None


def flag_noise(result: dict[str, Any], cores: int | None) -> None:
    """Sets ``result["noise"]`` (the reasons; empty when clean) and each row's ``x_ref_noisy``: the machine
    was overloaded (1-minute load average above ``cores``), or the row's or its ref's spread > NOISY_SPREAD."""
    load = result.get("load_average_start")
    overloaded = bool(load and cores and load[0] > cores)
    reasons = [f"load average {load[0]:g} on {cores} cores at the start"] if overloaded else []
    spread = {r["name"]: r["time_s"]["spread"] for r in result["training"] if r["status"] == "ok"}
    for res in result["training"]:
        if spread.get(res["name"], 0) > NOISY_SPREAD:
            reasons.append(f"{res['name']}: interquartile range {spread[res['name']]:.0%} of the median")
        noisy = overloaded or max(spread.get(res["name"], 0), spread.get("ref", 0)) > NOISY_SPREAD
        res["x_ref_noisy"] = res.get("x_ref") is not None and res["name"] != "ref" and noisy
    result["noise"] = reasons


def noise_warning(result: dict[str, Any]) -> str | None:
    """One line saying the figures are noise, why, and how to get clean ones (None when they look clean)."""
    if not result.get("noise"):
        return None
    return (
        f"warning: these timings are noise ({'; '.join(result['noise'])}), so the ratios marked (noise) are "
        "unreliable: for clean figures stop other jobs, rerun when `uptime` shows a load average well under the "
        "core count, or raise --repeats"
    )


# -- the benchmarks ---------------------------------------------------------------------------------------
def _failure(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory: pass a smaller --batch-size"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def run_benchmark(spec: argparse.Namespace, rows: list[RowConfig], command="", on_update=lambda r: None, log=print):
    """Time every row's step: ``spec.warmup`` untimed steps (compilation, allocator, lazy optimizer state), then
    ``spec.repeats`` x ``spec.iters`` timed ones. With ``spec.interleave`` the rows are timed repeat by repeat in
    ABBA order (a load change hits every row alike), else one row at a time (its CUDA peak memory is its own).
    A failing row is recorded and the others go on. Returns everything as one JSON-ready dict; ``on_update``
    gets it after each row too (partial outputs survive a timeout)."""
    t0, device = time.perf_counter(), torch.device(spec.device)
    cuda = device.type == "cuda"
    if cuda:  # the reference trainer's setting (it matters for the fp32 rows only)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    stats = model_stats(spec.model, spec.input_size, spec.num_classes, in_channels=spec.in_channels)
    name = describe_device(device)
    results = [{"name": r.name, "config": asdict(r), "status": "pending", "note": ""} for r in rows]
    result: dict[str, Any] = {
        "command": command, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "settings": vars(spec),
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "model": {"params": stats.params, "tokens": stats.tokens, "forward_gmacs_per_image": stats.gmacs},
        "training": results,
    }  # fmt: skip
    log(f"{spec.model} {spec.input_size}x{spec.input_size}x{spec.in_channels}, batch {spec.batch_size}, {name}")
    for res, row in zip(results, rows):
        if reason := skip_reason(row, device, spec.quick):
            res.update(status="skipped", note=reason)
            log(f"  {row.name}: skipped ({reason})")
    steps: dict[int, TrainStep] = {}

    def guarded(fn: Callable[[int], Any], i: int) -> None:  # a failing row is recorded, the others go on
        try:
            fn(i)
        except Exception as e:
            results[i].update(status="failed", note=_failure(e))
            steps.pop(i, None)
            log(f"  {rows[i].name}: failed: {results[i]['note']}")

    def warm_up(i: int) -> None:
        steps[i], t0 = TrainStep(spec, rows[i], device), time.perf_counter()
        time_per_call(steps[i].step, spec.warmup, device)
        results[i].update(warmup_s=time.perf_counter() - t0, raw_step_s=[])

    def time_row(i: int) -> None:
        results[i]["raw_step_s"].append(time_per_call(steps[i].step, spec.iters, device))

    todo = [i for i, r in enumerate(results) if r["status"] == "pending"]
    for group in [todo] if spec.interleave else [[i] for i in todo]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for i in group:
            guarded(warm_up, i)
        for rep in range(spec.repeats):
            order = [i for i in group if i in steps]
            for i in order if rep % 2 == 0 else order[::-1]:
                guarded(time_row, i)
        for i in [i for i in group if i in steps]:
            res, s = results[i], summarize(results[i]["raw_step_s"])
            ips, peak = spec.batch_size / s["median"], peak_tflops(name, rows[i].precision) if cuda else None
            tflops = ips * 6 * stats.gmacs / 1e3  # training image: 3 forwards (backward ~ 2) of 2 FLOPs per MAC
            res.update(status="ok", time_s=s, images_per_s=ips, tflops=tflops, mfu=tflops / peak if peak else None)
            res["memory_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
            log(f"  {res['name']}: {s['median'] * 1e3:.1f} ms/step, {ips:.3g} img/s")
        steps.clear()
        if any(rows[i].compile for i in group):
            torch._dynamo.reset()  # free the compiled graphs
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        add_ratios(results)
        on_update(result)
    result["wall_s"] = time.perf_counter() - t0
    flag_noise(result, os.cpu_count())
    on_update(result)
    return result


# -- reports ----------------------------------------------------------------------------------------------

TRAIN_COLUMNS = ("config", "precision", "attn", "compile", "ckpt", "AdamW", "EMA", "ms/step median (min-max)",
                 "IQR", "img/s", "TFLOP/s", "MFU", "peak mem", "× ref")  # fmt: skip


def _cells(res: dict[str, Any]) -> list[str]:
    c = res["config"]
    cells = [ROW_LABELS.get(res["name"], res["name"]), c["precision"], c["attn"], ["eager", "compile"][c["compile"]],
             ["no", "yes"][c["grad_checkpointing"]], c["optimizer"], c["ema"]]  # fmt: skip
    if res["status"] != "ok":
        return cells + [f"{res['status']}: {res['note']}"] + [""] * 6
    t = {k: res["time_s"][k] * 1e3 for k in ("median", "min", "max")}  # ms
    mfu, mem = res["mfu"], res["memory_bytes"]
    cells += [f"{t['median']:.4g} ({t['min']:.4g}-{t['max']:.4g})", f"{res['time_s']['spread']:.0%}"]
    cells += [f"{res['images_per_s']:.3g}", f"{res['tflops']:.3g}", "n/a" if mfu is None else f"{mfu:.1%}"]
    cells.append(f"{mem / 2**30:.2f} GiB" if mem else "n/a")
    noise = " (noise)" if res.get("x_ref_noisy") else ""
    return cells + ["n/a" if res["x_ref"] is None else f"{res['x_ref']:.2f}×{noise}"]


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    """A markdown table with aligned columns (readable in a terminal too)."""
    rows = [list(header), ["---"] * len(header), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows] + [""]


def format_report(result: dict[str, Any]) -> str:
    """The run as markdown: printed at the end and written by ``--markdown`` (benchmarks/results/*.md)."""
    s, m = result["settings"], result["model"]
    lines = [
        f"`{result['command']}`",
        "",
        f"- {s['model']}, input {s['input_size']}x{s['input_size']}x{s['in_channels']} ({m['tokens']} tokens), "
        f"{s['num_classes']} classes, batch {s['batch_size']}, {result['device']}, torch {result['torch']}, "
        f"{result['date']}, load average at the start {result['load_average_start']}",
        f"- timing: {s['warmup']} warm-up step(s), then {s['repeats']} x {s['iters']} step(s), rows "
        + ("interleaved (ABBA)" if s["interleave"] else "one at a time")
        + f"; FLOPs per training image = 6 x {m['forward_gmacs_per_image']:.4g} forward GMACs; MFU vs dense peak",
        "",
    ]
    lines += _table(TRAIN_COLUMNS, [_cells(r) for r in result["training"]])
    lines += [f"wall time: {result['wall_s']:.1f} s" if "wall_s" in result else "(partial: the run did not finish)"]
    return "\n".join(lines + [w for w in [noise_warning(result)] if w]) + "\n"


def write_outputs(result: dict[str, Any], json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        write_json(json_path, result)
    if markdown_path:
        write_text(markdown_path, format_report(result))


# -- command line ------------------------------------------------------------------------------------------

#: 'auto' defaults: (CUDA, CPU, --quick)
DEFAULTS = {"model": ("DiT-XL/2", "DiT-S/4", "DiT-Ti/4"), "input_size": (32, 32, 16), "batch_size": (64, 16, 8),
            "warmup": (3, 1, 1), "iters": (10, 2, 2)}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m minidit.bench", description=__doc__, epilog="auto: the CUDA, CPU and --quick "
                       "defaults, in that order", formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add, pint = p.add_argument, positive_int
    add("--configs", default=None, help="rows, e.g. 'ref,bf16,bf16+compile,ref-2023' (default: ref,minidit)")
    add("--model", choices=MODELS, metavar="NAME", default=None, help="auto: DiT-XL/2, DiT-S/4, DiT-Ti/4")
    add("--input-size", type=pint, default=None, help="latent/pixel side I (auto: 32, 32, 16)")
    add("--in-channels", type=pint, default=4, help="4 for SD-VAE latents, 3 for pixels")
    add("--num-classes", type=pint, default=1000)
    add("--batch-size", type=pint, default=None, help="auto: 64 (32 for L/XL under 100 GiB), 16, 8")
    add("--warmup", type=pint, default=None, help="untimed steps first (auto: 3, 1, 1)")
    add("--iters", type=pint, default=None, help="steps per timed repeat (auto: 10, 2, 2)")
    add("--repeats", type=pint, default=5, help="timed repeats; the median is reported")
    add("--no-sampling", action="store_true", help=argparse.SUPPRESS)  # a no-op: sampling is no longer timed
    add("--device", default="auto", choices=("auto", "cuda", "cpu"))
    add("--quick", action="store_true", help="a small, fast run (CPU: < 1 min on an idle machine)")
    add("--json", default=None, help="write all settings, results and raw timings here")
    add("--markdown", default=None, help="write the tables as markdown here")
    return p


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, list[RowConfig]]:
    """Fill in the 'auto' defaults and check every value (UserError if bad): the settings and the rows."""
    device = resolve_device("cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device)
    cuda, auto_batch = device.type == "cuda", args.batch_size is None
    for key, choices in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, choices[2 if args.quick else 0 if cuda else 1])
    big = args.model.split("/")[0] in ("DiT-L", "DiT-XL")
    if auto_batch and cuda and big and torch.cuda.get_device_properties(device).total_memory < 100 * 2**30:
        args.batch_size = 32  # the ref-2023 row keeps its [B, H, T, T] attention maps
    args.device, args.interleave = str(device), not cuda  # CPU: rows timed repeat by repeat (ABBA)
    if args.input_size % MODELS[args.model][3]:
        raise UserError(f"--input-size {args.input_size} is not divisible by {args.model}'s patch size")
    for path in (args.json, args.markdown):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: the directory does not exist")
    if args.configs is None:
        return args, [reference_row(device), parse_config("minidit", device)]
    return args, parse_configs(args.configs, device)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    spec, rows = resolve(args)
    command = "python -m minidit.bench " + " ".join(argv)
    result = run_benchmark(spec, rows, command, lambda r: write_outputs(r, args.json, args.markdown),
                           log=lambda s: print(s, flush=True))  # fmt: skip
    print("\n" + format_report(result), end="", flush=True)
    return 1 if any(r["status"] == "failed" for r in result["training"]) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
