"""Benchmark the DiT training step and sampler against the reference recipe: ``python -m minidit.bench``.

    python -m minidit.bench --quick                # CPU smoke run (< 1 min): reference row vs minidit's row
    python -m minidit.bench                        # CUDA: DiT-XL/2 at 256 px, reference vs bf16+sdpa+compile
    python -m minidit.bench --configs ref,fp32,bf16,bf16+compile,ref-2023 --json out.json

**The training step** (one row per config): forward + backward + AdamW step + EMA update, on
random latents x [B, C, I, I], labels y [B] and timesteps t [B] through
``diffusion.training_losses`` (the hybrid loss), exactly what the trainer does per step. Reported:
images/s, tokens/s (images/s x I^2 / p^2), achieved TFLOP/s and MFU, counting
3 x 2 x forward GMACs (``model_stats``: the paper's "Gflops", math attention included) FLOPs per
training image against a table of dense tensor-core peaks (``GPU_PEAKS``), and peak memory.

**The reference recipe is always the first row** (``ref``), measured in the same process on the
same model and batch, as the reference code runs when installed today (its environment file does
not pin timm): fp32 (TF32 matmuls allowed on a GPU, as the reference trainer sets), ``sdpa``
attention (timm >= 0.9's ``Attention`` calls ``F.scaled_dot_product_attention``: ``fused_attn``,
on by default), eager, ``torch.optim.AdamW`` with torch's default implementation (the per-tensor
loop on a CPU, foreach on CUDA), and the EMA as a Python loop of ``mul_``/``add_`` over all
parameters (the frozen ``pos_embed`` included). "× ref" = a row's images/s divided by this row's.
(The reference trainer also calls ``loss.item()`` every step, a host sync; this row leaves it
out, so the reference is measured slightly *faster* than it runs.) ``ref-2023`` is the same
recipe with ``math`` attention, as the timm of the 2023 release ran it: an extra row for
comparison with older figures, never the baseline.

**Configs** (``--configs``, comma-separated; ``ref`` is prepended when missing). Each config
other than ``ref`` and ``ref-2023`` is a ``+``-joined list of changes from the reference's
fp32 / sdpa / eager, run with minidit's optimizer and EMA (``minidit.train.make_optimizer``:
fused AdamW on CUDA and CPU; ``minidit.train.update_ema``: one ``torch._foreach_lerp_``):

    fp32 | bf16 | fp16         precision (bf16/fp16: autocast; fp16 with a GradScaler)
    sdpa | math | flash        attention backend (flash = the flash-attn package)
    compile                    torch.compile the model (compile time is excluded: warm-up)
    ckpt                       gradient checkpointing (its recompute is not counted as FLOPs)
    opt=plain|foreach|fused    override the AdamW implementation
    ema=loop|foreach           override the EMA update
    minidit                    this device's defaults: CUDA bf16+sdpa+compile, CPU fp32+sdpa

Without ``--configs`` the rows are ``ref`` and one minidit row from ``--precision``,
``--attn``, ``--compile`` and ``--grad-checkpointing`` (``--configs`` adds ``ref-2023``). The
first non-reference row is the headline row: sampling and ``--profile-below`` use it. Rows a
device cannot run (bf16/fp16 or flash on a CPU, compile on a CPU under ``--quick``, flash
without the package) are skipped with a note.

**Timing**: ``--warmup`` steps first (not timed: compilation, allocator, lazy optimizer state),
then ``--repeats`` timings of ``--iters`` back-to-back steps each, with CUDA events on a GPU
(one sync per repeat: the timer's) or ``time.perf_counter`` on a CPU. The median time per step
is reported with min-max and the interquartile range; raw timings go to ``--json``. On a CPU
the rows are interleaved repeat by repeat (ABBA order), so load from other processes hits all
rows alike; on a GPU each row runs alone, so its peak memory is its own. **Noise**: when the
machine is overloaded (1-minute load average at the start above the core count) or a row's
interquartile range exceeds ``NOISY_SPREAD`` of its median, the report says the figures are
noise, in one line, and marks the affected ratios "(noise)".

**Sampling** (headline row and reference): DDPM-250 and DDIM-50, both with classifier-free
guidance (the batch is doubled: conditional and null labels), in images/s of final samples
(``minidit.sample.generate``; ``--quick`` runs fewer steps and says so).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diffusion import create_diffusion
from .errors import ArgumentParser, UserError, run_cli
from .model import MODELS, create_model
from .stats import model_stats
from .train import make_optimizer, optimizer_kind, update_ema

# --------------------------------------------------------------------------
# Peak throughput and FLOPs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPeak:
    """Dense peak TFLOP/s of one GPU model for the matmuls of each precision."""

    name: str
    pattern: str  # regex searched in torch.cuda.get_device_name()
    bf16: float | None
    fp16: float | None
    fp32: float | None  # TF32 tensor cores where the GPU has them (TF32 is on, as in the reference), else FP32


#: First match wins, so the more specific names come first ("H100 PCIe" before "H100").
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H100 PCIe", r"H100.*PCIE", 756.0, 756.0, 378.0),
    GpuPeak("H100 NVL", r"H100.*NVL", 835.0, 835.0, 418.0),
    GpuPeak("H200 NVL", r"H200.*NVL", 835.0, 835.0, 418.0),
    GpuPeak("GH200", r"GH200", 989.0, 989.0, 494.0),
    GpuPeak("H100 SXM", r"\bH100\b", 989.0, 989.0, 494.0),
    GpuPeak("H200 SXM", r"\bH200\b", 989.0, 989.0, 494.0),
    GpuPeak("A100", r"\bA100\b", 312.0, 312.0, 156.0),
    GpuPeak("L40S", r"\bL40S\b", 362.0, 362.0, 183.0),
    GpuPeak("L40", r"\bL40\b", 181.0, 181.0, 90.5),
    GpuPeak("L4", r"\bL4\b", 121.0, 121.0, 60.0),
    GpuPeak("A10G", r"\bA10G\b", 125.0, 125.0, 62.5),
    GpuPeak("A10", r"\bA10\b", 125.0, 125.0, 62.5),
    GpuPeak("RTX 4090", r"RTX 4090", 165.0, 165.0, 82.6),
    GpuPeak("V100", r"\bV100", None, 125.0, 15.7),
    GpuPeak("T4", r"\bT4\b", None, 65.0, 8.1),
)
PEAK_SOURCE = (
    "dense tensor-core peaks (no 2:4 sparsity) from NVIDIA's datasheets at boost clock; fp32 rows are "
    "rated against the TF32 peak (TF32 matmuls are on, as in the reference trainer), or plain FP32 on "
    "GPUs without TF32 (V100, T4); A10G assumed equal to the A10 datasheet; --peak-tflops overrides"
)


def find_peak(device_name: str) -> GpuPeak | None:
    """The ``GPU_PEAKS`` entry for a ``torch.cuda.get_device_name()`` string, or None (CPU, unknown GPU)."""
    for peak in GPU_PEAKS:
        if re.search(peak.pattern, device_name, re.IGNORECASE):
            return peak
    return None


def peak_tflops(peak: GpuPeak | None, precision: str) -> float | None:
    """Peak TFLOP/s for the matmuls of a row run in ``precision`` (fp32 | bf16 | fp16), None if unknown."""
    return None if peak is None else getattr(peak, precision)


def train_flops_per_image(gmacs: float) -> float:
    """FLOPs of one training image: backward ~ 2 forwards, so 3 forwards of 2 FLOPs per MAC."""
    return 3 * 2 * gmacs * 1e9


def throughput(
    step_s: float, batch_size: int, tokens: int, flops_per_image: float, peak: float | None
) -> dict[str, float | None]:
    """images/s, tokens/s, achieved TFLOP/s and MFU (a fraction; None without a known peak) of a step."""
    images = batch_size / step_s
    tflops = images * flops_per_image / 1e12
    return {
        "images_per_s": images,
        "tokens_per_s": images * tokens,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
    }


# --------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile of sorted samples, interpolating linearly between order statistics."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, min, max, q1, q3, n and spread (interquartile range / median) of a list of timings (seconds)."""
    if not samples:
        raise ValueError("no timings to summarize")
    xs = sorted(samples)
    median, q1, q3 = quantile(xs, 0.5), quantile(xs, 0.25), quantile(xs, 0.75)
    return {
        "median": median,
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "spread": (q3 - q1) / median if median > 0 else 0.0,
    }


#: A row's timings are noise when their interquartile range is more than this fraction of their median
#: (a quiet machine: a few percent).
NOISY_SPREAD = 0.25


def flag_noise(result: dict[str, Any], cores: int | None) -> None:
    """Say whether a run's figures are noise: sets ``result["noise"]`` (the reasons, empty when clean) and each
    row's ``x_ref_noisy`` (its ratio is unreliable: the machine was overloaded, or its timings or its reference
    row's are spread wider than ``NOISY_SPREAD``). ``cores``: the machine's CPU count (``os.cpu_count()``)."""
    load = result.get("load_average_start")
    overloaded = bool(load and cores and load[0] > cores)
    reasons = [f"load average {load[0]:g} on {cores} cores at the start"] if overloaded else []
    rows = result["training"] + result["sampling"]

    def spread(res: dict[str, Any] | None) -> float:  # 0 for a row without timings
        ok = res is not None and res["status"] == "ok"
        return res.get("step_s", res.get("loop_s"))["spread"] if ok else 0.0

    for res in rows:
        if spread(res) > NOISY_SPREAD:
            label = res["name"] + (f" {res['sampler']}" if "sampler" in res else "")
            reasons.append(f"{label}: interquartile range {spread(res):.0%} of the median")
        ref = _ref_of(res, rows)
        noisy = overloaded or max(spread(res), spread(ref)) > NOISY_SPREAD
        res["x_ref_noisy"] = res.get("x_ref") is not None and res is not ref and noisy
    result["noise"] = reasons


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(
    fn: Callable[[], Any], iters: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls.

    On a GPU: CUDA events around the calls and one synchronisation at the end (the only host
    sync we add), so GPU idle time from slow launches counts too. On a CPU: ``clock``.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = clock()
    for _ in range(iters):
        fn()
    return (clock() - t0) / iters


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """How many synchronising CUDA calls one call of ``fn`` makes (``torch.cuda.set_sync_debug_mode``).

    Counts those raised on the Python thread (forward, loss, optimizer, EMA); the backward runs on
    autograd's threads, whose warnings may not be seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# --------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")
ATTN_BACKENDS = ("sdpa", "math", "flash_attn")
OPTIMIZERS = ("plain", "foreach", "fused")
EMAS = ("loop", "foreach")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RowConfig:
    """One row of the table: how the training step is run."""

    name: str
    reference: bool = False  # the reference recipe (ref, ref-2023): its optimizer, EMA and step order
    precision: str = "fp32"
    attn: str = "sdpa"
    compile: bool = False
    grad_checkpointing: bool = False
    optimizer: str = "plain"  # plain: per-tensor AdamW; foreach; fused
    ema: str = "loop"  # loop: the reference's Python loop; foreach: minidit.train.update_ema

    def describe(self) -> str:
        bits = [self.precision, self.attn, "compile" if self.compile else "eager"]
        if self.grad_checkpointing:
            bits.append("grad-ckpt")
        return " ".join(bits + [f"AdamW-{self.optimizer}", f"EMA-{self.ema}"])


def reference_row(device: torch.device, name: str = "ref") -> RowConfig:
    """The reference recipe as it runs today: fp32 (TF32 on GPU), sdpa attention (timm's ``fused_attn``),
    eager, torch's default AdamW (per-tensor on a CPU, foreach on CUDA: torch has foreach kernels for
    CUDA, not CPU), EMA loop. ``name="ref-2023"``: the same with math attention, as in 2023."""
    optimizer = "foreach" if device.type == "cuda" else "plain"
    return RowConfig(name, reference=True, attn="math" if name == "ref-2023" else "sdpa", optimizer=optimizer)


#: What the reference rows are, for the tables.
ROW_LABELS = {"ref": "ref (reference)", "ref-2023": "ref-2023 (extra: 2023 math attention)"}


def minidit_defaults(device: torch.device) -> dict[str, Any]:
    """minidit's recommended settings on ``device``: bf16 + sdpa + compile on CUDA, fp32 + sdpa on CPU."""
    cuda = device.type == "cuda"
    return {"precision": "bf16" if cuda else "fp32", "attn": "sdpa", "compile": cuda}


def parse_config(text: str, device: torch.device) -> RowConfig:
    """``"bf16+sdpa+compile"`` -> a RowConfig (see the module docstring for the tokens)."""
    name = text.strip()
    if name in ROW_LABELS:
        return reference_row(device, name)
    row = RowConfig(name, optimizer=optimizer_kind(device), ema="foreach")
    tokens = [t.strip() for t in name.split("+")]
    if not all(tokens):
        raise UserError(f"--configs: empty item in {name!r}")
    for token in tokens:
        key, _, value = token.partition("=")
        if token in PRECISIONS:
            row = replace(row, precision=token)
        elif token in ("math", "sdpa", "flash", "flash_attn"):
            row = replace(row, attn="flash_attn" if token.startswith("flash") else token)
        elif token == "compile":
            row = replace(row, compile=True)
        elif token in ("ckpt", "grad-ckpt"):
            row = replace(row, grad_checkpointing=True)
        elif token == "minidit":
            row = replace(row, **minidit_defaults(device))
        elif key == "opt" and value in OPTIMIZERS:
            row = replace(row, optimizer=value)
        elif key == "ema" and value in EMAS:
            row = replace(row, ema=value)
        elif token in ROW_LABELS:
            raise UserError(f"--configs: {token!r} is a config of its own, not a change ({name!r})")
        else:
            raise UserError(
                f"--configs: unknown item {token!r} in {name!r}; use ref, ref-2023 or '+'-joined fp32|bf16|fp16, "
                "sdpa|math|flash, compile, ckpt, opt=plain|foreach|fused, ema=loop|foreach, minidit"
            )
    return row


def parse_configs(text: str, device: torch.device) -> list[RowConfig]:
    """A comma-separated sweep -> rows, the reference first (added when missing), duplicates dropped."""
    rows = [reference_row(device)]
    for item in text.split(","):
        if item.strip() and (row := parse_config(item, device)) not in rows:
            rows.append(row)
    return rows


def skip_reason(row: RowConfig, device: torch.device, quick: bool) -> str | None:
    """Why ``row`` cannot run here (None: it can). GPU features degrade to a skipped row, never a crash."""
    if device.type != "cuda":
        if row.precision != "fp32":
            return f"{row.precision} autocast is benchmarked on CUDA only"
        if row.attn == "flash_attn":
            return "flash_attn needs a CUDA GPU"
        if row.compile and quick:
            return "torch.compile on a CPU takes minutes to compile: excluded from --quick"
        return None
    if row.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16"
    if row.attn == "flash_attn":
        from .attention import _flash_attn_func

        if _flash_attn_func() is None:
            return "the flash-attn package is not installed"
        if row.precision == "fp32":
            return "flash_attn needs bf16 or fp16"
    return None


@dataclass
class Spec:
    """Everything shared by the rows: the model, the data shape and the measurement."""

    model: str
    input_size: int
    in_channels: int
    num_classes: int
    batch_size: int
    device: str
    warmup: int
    iters: int
    repeats: int
    interleave: bool
    quick: bool = False
    training: bool = True
    sampling: bool = True
    sample_batch: int = 2
    ddpm_steps: int = 250
    ddim_steps: int = 50
    cfg_scale: float = 4.0
    sample_repeats: int = 3
    vae_in_loop: bool = False
    vae: str | None = None
    peak_tflops: float | None = None
    profile_below: float | None = None
    seed: int = 0

    @property
    def patch_size(self) -> int:
        return int(self.model.rsplit("/", 1)[1])

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# --------------------------------------------------------------------------
# The training step of one row
# --------------------------------------------------------------------------


@torch.no_grad()
def reference_ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The reference trainer's EMA: a Python loop with one ``mul_`` and one ``add_`` per parameter
    (the frozen ``pos_embed`` included)."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.data, alpha=1 - decay)


class TinyEncoder(nn.Module):
    """A stand-in for the VAE encoder when none is given: three stride-2 convolutions,
    images [B, 3, 8I, 8I] -> posterior sample [B, C, I, I]. Far cheaper than the SD VAE."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 2 * out_channels, 3, stride=2, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.net(images).chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215


def build_encoder(spec: Spec, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The image -> latent encoder run inside each step for ``--vae-in-loop``, and what it is."""
    if spec.vae:
        from . import vae

        try:
            model = vae.load_vae(spec.vae, device=device)
        except UserError as e:
            note = f"VAE {spec.vae} unavailable ({e}); using the tiny stand-in encoder"
        else:
            if vae.downsample_factor(model) != 8 or model.config.latent_channels != spec.in_channels:
                raise UserError(f"--vae {spec.vae}: not an 8x VAE with {spec.in_channels} latent channels")
            return (lambda images: vae.encode(model, images)), f"AutoencoderKL {spec.vae} (fp32)"
    else:
        note = "tiny stand-in encoder (3 convs; not the SD VAE's cost)"
    torch.manual_seed(spec.seed)
    encoder = TinyEncoder(spec.in_channels).to(device).eval().requires_grad_(False)
    return encoder, note


class TrainStep:
    """One row's model, EMA, optimizer and batch; ``step()`` is one training step, as timed.

    x [B, C, I, I] (or images [B, 3, 8I, 8I] encoded inside the step with ``--vae-in-loop``) and
    y [B] are drawn once; each step draws t [B] (and, for minidit rows, the label-drop mask
    [B] as the trainer passes it) on the device, so nothing waits for the host.
    """

    def __init__(self, spec: Spec, row: RowConfig, device: torch.device, encoder=None):
        self.row, self.device, self.encoder = row, device, encoder
        torch.manual_seed(spec.seed)
        with torch.device(device):
            self.model = create_model(
                spec.model,
                input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes,
                attn_backend=row.attn, grad_checkpointing=row.grad_checkpointing,
            ).train()  # fmt: skip
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # the reference passes every parameter (pos_embed has no grad and is skipped), the trainer the trainable ones
        params = [p for p in self.model.parameters() if p.requires_grad or row.reference]
        self.opt = make_optimizer(params, lr=1e-4, weight_decay=0.0, device=device, kind=row.optimizer)
        self.forward = torch.compile(self.model) if row.compile else self.model
        self.amp_dtype = AMP_DTYPES[row.precision]
        self.scaler = torch.amp.GradScaler(device.type) if row.precision == "fp16" else None
        self.diffusion = create_diffusion("")
        self.drop_prob = self.model.y_embedder.dropout_prob
        g = torch.Generator(device).manual_seed(spec.seed)
        B, C, size = spec.batch_size, spec.in_channels, spec.input_size
        if encoder is not None:
            self.images = torch.rand(B, 3, 8 * size, 8 * size, generator=g, device=device) * 2 - 1
        self.x = torch.randn(B, C, size, size, generator=g, device=device)
        self.y = torch.randint(0, spec.num_classes, (B,), generator=g, device=device)

    def step(self) -> None:
        """forward + loss, backward, AdamW step, EMA update: no host sync."""
        B = self.x.shape[0]
        x = self.x
        if self.encoder is not None:
            with torch.no_grad():
                x = self.encoder(self.images)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=self.device)
        kwargs: dict[str, torch.Tensor] = {"y": self.y}
        if not self.row.reference:  # the trainer draws the CFG label drops itself
            kwargs["force_drop_ids"] = (torch.rand(B, device=self.device) < self.drop_prob).long()
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            loss = self.diffusion.training_losses(self.forward, x, t, model_kwargs=kwargs)["loss"].mean()
        if self.row.reference:  # the reference's order: zero_grad, backward, step, EMA
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        else:  # the trainer's order
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.row.ema == "loop":
            reference_ema_update(self.ema, self.model, 0.9999)
        else:
            update_ema(self.ema, self.model, 0.9999)


def profile_table(fn: Callable[[], Any], device: torch.device, steps: int = 3, row_limit: int = 15) -> str:
    """torch.profiler over ``steps`` calls: the top ops by self device time (CPU time on a CPU)."""
    from torch.autograd.profiler_util import FunctionEventAvg
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    key = "self_cpu_time_total"
    if device.type == "cuda":  # named "self_device_time_total" since torch 2.4
        new_name = hasattr(FunctionEventAvg, "self_device_time_total")
        key = "self_device_time_total" if new_name else "self_cuda_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


# --------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------


def memory_now(device: torch.device) -> int:
    """Peak memory in bytes: CUDA max allocated since the last reset, or this process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory: pass a smaller --batch-size"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


def bench_training(
    spec: Spec,
    rows: list[RowConfig],
    ctx: dict[str, Any],
    on_row: Callable[[dict[str, Any]], None] = lambda r: None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time the training step of every row. Returns one dict per row (``status`` ok | skipped | failed).

    ``ctx`` holds what the rows share: ``device``, ``flops_per_image``, ``peak`` (GpuPeak or None)
    and ``encoder`` (for ``--vae-in-loop``). ``on_row`` is called with the results so far after
    each row finishes (to write partial outputs).
    """
    device: torch.device = ctx["device"]
    results = [{"name": r.name, "config": asdict(r), "status": "pending", "note": ""} for r in rows]
    runners: dict[int, TrainStep] = {}

    def fail(i: int, e: BaseException) -> None:
        results[i].update(status="failed", note=_failure(e))
        runners.pop(i, None)
        log(f"  {rows[i].name}: failed: {results[i]['note']}")
        if rows[i].compile:
            torch._dynamo.reset()
        free_memory(device)

    def prepare(i: int) -> None:
        """Build row i and run its warm-up steps (not timed, but their wall time is recorded)."""
        row = rows[i]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runner = TrainStep(spec, row, device, ctx.get("encoder"))
        t0 = time.perf_counter()
        for k in range(spec.warmup):
            runner.step()
            if k == 0:
                synchronize(device)
                results[i]["first_step_s"] = time.perf_counter() - t0
        synchronize(device)
        results[i]["warmup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            results[i]["host_syncs_per_step"] = count_host_syncs(runner.step)
        runners[i] = runner
        results[i]["raw_step_s"] = []

    def finish(i: int) -> None:
        """Turn row i's raw timings into the reported numbers (and profile it if asked)."""
        res, row = results[i], rows[i]
        summary = summarize(res["raw_step_s"])
        peak = spec.peak_tflops or peak_tflops(ctx["peak"], row.precision)
        res.update(status="ok", step_s=summary, peak_tflops=peak)
        res.update(throughput(summary["median"], spec.batch_size, spec.tokens, ctx["flops_per_image"], peak))
        res["memory_bytes"] = memory_now(device)
        headline = i == next((k for k, r in enumerate(rows) if not r.reference), None)
        if headline and spec.profile_below is not None and (res["mfu"] is None or res["mfu"] < spec.profile_below):
            log(f"  profiling {row.name} (MFU {_fmt_pct(res['mfu'])} < {spec.profile_below:.0%})")
            try:
                res["profile"] = profile_table(runners[i].step, device)
            except Exception as e:  # a profiler problem must not lose the measurement
                res["profile"] = f"profiling failed: {_failure(e)}"
        log(
            f"  {row.name}: {summary['median'] * 1e3:.1f} ms/step (min {summary['min'] * 1e3:.1f}, "
            f"max {summary['max'] * 1e3:.1f}), {res['images_per_s']:.2f} img/s"
        )

    def release(i: int) -> None:
        runners.pop(i, None)
        if rows[i].compile:
            torch._dynamo.reset()
        free_memory(device)

    def report() -> None:
        add_ratios(results, "images_per_s")
        on_row(results)

    for i, row in enumerate(rows):
        reason = skip_reason(row, device, spec.quick)
        if reason:
            results[i].update(status="skipped", note=reason)
            log(f"  {row.name}: skipped ({reason})")

    todo = [i for i, r in enumerate(results) if r["status"] == "pending"]
    if spec.interleave:  # build and warm every row, then time them repeat by repeat, ABBA order
        for i in todo:
            try:
                prepare(i)
            except Exception as e:
                fail(i, e)
        for rep in range(spec.repeats):
            order = [i for i in todo if i in runners]
            for i in order if rep % 2 == 0 else order[::-1]:
                try:
                    results[i]["raw_step_s"].append(time_per_call(runners[i].step, spec.iters, device))
                except Exception as e:
                    fail(i, e)
        for i in todo:
            if i in runners:
                try:
                    finish(i)
                except Exception as e:
                    fail(i, e)
        for i in todo:
            release(i)
        report()
    else:  # one row at a time: its peak memory is its own
        for i in todo:
            try:
                prepare(i)
                for _ in range(spec.repeats):
                    results[i]["raw_step_s"].append(time_per_call(runners[i].step, spec.iters, device))
                finish(i)
            except Exception as e:
                fail(i, e)
            release(i)
            report()
    add_ratios(results, "images_per_s")
    return results


def _ref_of(res: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``ref`` row ``res`` is compared with (the same sampler for sampling rows)."""
    return next((r for r in results if r["name"] == "ref" and r.get("sampler") == res.get("sampler")), None)


def add_ratios(results: list[dict[str, Any]], key: str) -> None:
    """Set ``x_ref`` = result[key] / the ``ref`` row's (same sampler for sampling rows), None where unknown."""
    for res in results:
        ref = _ref_of(res, results)
        ok = ref is not None and ref["status"] == "ok" and res["status"] == "ok"
        res["x_ref"] = res[key] / ref[key] if ok and ref[key] else None


def sample_once(model, labels: torch.Tensor, sampler: str, steps: int, spec: Spec, row: RowConfig) -> torch.Tensor:
    """One sampling loop for ``labels`` [N] with ``minidit.sample.generate`` (CFG: a [2N] model batch),
    under the row's autocast."""
    from .sample import generate

    device = torch.device(spec.device)
    dtype = AMP_DTYPES[row.precision]
    with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
        return generate(model, labels, cfg_scale=spec.cfg_scale, num_steps=steps, sampler=sampler, device=device)


def bench_sampling(
    spec: Spec,
    rows: list[RowConfig],
    ctx: dict[str, Any],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """images/s of DDPM and DDIM sampling with CFG for each row (precision, attention, compile).

    One loop samples ``spec.sample_batch`` images: a [2 x sample_batch] model batch per step
    (conditional and null labels). Warm-up: one 2-step loop per sampler; then
    ``spec.sample_repeats`` timed loops each.
    """
    device: torch.device = ctx["device"]
    results = []
    labels = torch.arange(spec.sample_batch) % spec.num_classes
    for row in rows:
        base = {"name": row.name, "config": asdict(row), "batch": spec.sample_batch, "cfg_scale": spec.cfg_scale}
        reason = skip_reason(row, device, spec.quick)
        model = None
        try:
            if reason is None:
                torch.manual_seed(spec.seed)
                with torch.device(device):
                    model = create_model(
                spec.model,
                        input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes,
                        attn_backend=row.attn,
                    ).eval()  # fmt: skip
                if row.compile:  # forward_with_cfg calls self.forward: the compiled one
                    model.forward = torch.compile(model.forward)
        except Exception as e:
            reason = _failure(e)
        for sampler, steps in (("ddpm", spec.ddpm_steps), ("ddim", spec.ddim_steps)):
            res = {**base, "sampler": sampler, "steps": steps, "status": "skipped", "note": reason or ""}
            results.append(res)
            if model is None:
                log(f"  {row.name} {sampler}-{steps}: skipped ({reason})")
                continue
            try:
                t0 = time.perf_counter()
                sample_once(model, labels, sampler, min(2, steps), spec, row)
                synchronize(device)
                res["warmup_s"] = time.perf_counter() - t0
                loop = partial(sample_once, model, labels, sampler, steps, spec, row)
                raw = [time_per_call(loop, 1, device) for _ in range(spec.sample_repeats)]
            except Exception as e:
                res.update(status="failed", note=_failure(e))
                log(f"  {row.name} {sampler}-{steps}: failed: {res['note']}")
                continue
            summary = summarize(raw)
            res.update(status="ok", raw_loop_s=raw, loop_s=summary, step_ms=summary["median"] / steps * 1e3)
            res["images_per_s"] = spec.sample_batch / summary["median"]
            log(f"  {row.name} {sampler}-{steps}: {summary['median']:.2f} s/loop, {res['images_per_s']:.3f} img/s")
        model = None
        if row.compile:
            torch._dynamo.reset()
        free_memory(device)
    add_ratios(results, "images_per_s")
    return results


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def process_wall_time() -> float | None:
    """Seconds since this process started (imports included), from /proc; None where unavailable."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def run_benchmark(
    spec: Spec,
    rows: list[RowConfig],
    command: str = "",
    on_update: Callable[[dict[str, Any]], None] = lambda r: None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the training (and sampling) benchmark; returns everything as one JSON-ready dict."""
    device = torch.device(spec.device)
    if device.type == "cuda":  # the reference trainer's setting; it matters for the fp32 rows only
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):  # model_stats takes a name from MODELS or an instance
        meta_model = create_model(
            spec.model, input_size=spec.input_size, in_channels=spec.in_channels, num_classes=spec.num_classes
        )
    stats = model_stats(meta_model)
    dev = describe_device(device)
    peak = find_peak(dev["name"]) if device.type == "cuda" else None
    result: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": dev,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "load_average_start": _loadavg(),
        "settings": asdict(spec),
        "model": {
            "name": spec.model,
            "params": stats.params,
            "tokens": spec.tokens,
            "forward_gmacs_per_image": stats.gmacs,
            "train_flops_per_image": train_flops_per_image(stats.gmacs),
        },
        "peak": {
            "gpu": peak.name if peak else None,
            "table": asdict(peak) if peak else None,
            "override_tflops": spec.peak_tflops,
            "source": PEAK_SOURCE,
        },
        "memory_kind": memory_kind(device, spec.interleave),
        "notes": [],
        "training": [],
        "sampling": [],
    }
    ctx: dict[str, Any] = {"device": device, "flops_per_image": train_flops_per_image(stats.gmacs), "peak": peak}
    if spec.vae_in_loop:
        ctx["encoder"], note = build_encoder(spec, device)
        result["notes"].append(f"--vae-in-loop: every step (all rows) encodes images with the {note}")
    if spec.quick:
        result["notes"].append(
            f"--quick: a small model and few iterations; sampling runs DDPM-{spec.ddpm_steps} and "
            f"DDIM-{spec.ddim_steps} instead of DDPM-250 and DDIM-50"
        )
    log(
        f"{spec.model} {spec.input_size}x{spec.input_size}x{spec.in_channels}, batch {spec.batch_size}, "
        f"{dev['name']}; rows: {', '.join(r.name for r in rows)}"
    )

    def update(training: list[dict[str, Any]]) -> None:
        result["training"] = training
        on_update(result)

    if spec.training:
        result["training"] = bench_training(spec, rows, ctx, on_row=update, log=log)
        on_update(result)
    if spec.sampling:
        headline = next((r for r in rows if not r.reference), None)
        sample_rows = [rows[0]] + ([headline] if headline else [])
        log(f"sampling: batch {spec.sample_batch} with CFG (model batch {2 * spec.sample_batch})")
        result["sampling"] = bench_sampling(spec, sample_rows, ctx, log=log)
    result["load_average_end"] = _loadavg()
    result["wall_s"] = process_wall_time()
    flag_noise(result, os.cpu_count())
    on_update(result)
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def memory_kind(device: torch.device, interleave: bool) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated" + (" (all rows: interleaved)" if interleave else " (per row)")
    return "process max RSS (resource.getrusage; cumulative over the process, not per row)"


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _fmt_ratio(res: dict[str, Any]) -> str:
    x = res["x_ref"]
    return "n/a" if x is None else f"{x:.2f}×" + (" (noise)" if res.get("x_ref_noisy") else "")


def noise_warning(result: dict[str, Any]) -> str | None:
    """One line saying the figures are noise, why, and how to get clean ones (None when they look clean)."""
    if not result.get("noise"):
        return None
    return (
        f"warning: these timings are noise ({'; '.join(result['noise'])}), so the ratios marked (noise) are "
        "unreliable: for clean figures stop other jobs, rerun when `uptime` shows a load average well under the "
        "core count, or raise --repeats"
    )


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _fmt_num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


TRAIN_COLUMNS = (
    "config", "precision", "attn", "compile", "ckpt", "AdamW", "EMA",
    "step ms: median [IQR] (min-max)", "img/s", "tokens/s", "TFLOP/s", "MFU", "peak mem", "× ref",
)  # fmt: skip
SAMPLE_COLUMNS = ("config", "sampler", "steps", "images", "s/loop: median (min-max)", "ms/step", "img/s", "× ref")


def training_cells(res: dict[str, Any]) -> list[str]:
    c = res["config"]
    name = ROW_LABELS.get(res["name"], res["name"])
    yes_no = {True: "yes", False: "no"}
    cells = [name, c["precision"], c["attn"], yes_no[c["compile"]], yes_no[c["grad_checkpointing"]]]
    cells += [c["optimizer"], c["ema"]]
    if res["status"] != "ok":
        return cells + [f"{res['status']}: {res['note']}"] + [""] * 6
    s = {k: v * 1e3 for k, v in res["step_s"].items() if k != "n"}
    return cells + [
        f"{s['median']:.1f} [{s['q1']:.1f}-{s['q3']:.1f}] ({s['min']:.1f}-{s['max']:.1f})",
        f"{res['images_per_s']:.3g}",
        _fmt_num(res["tokens_per_s"]),
        f"{res['tflops']:.3g}",
        _fmt_pct(res["mfu"]),
        _fmt_bytes(res.get("memory_bytes")),
        _fmt_ratio(res),
    ]


def sampling_cells(res: dict[str, Any]) -> list[str]:
    cells = [res["name"], f"{res['sampler'].upper()} + CFG {res['cfg_scale']:g}", str(res["steps"]), str(res["batch"])]
    if res["status"] != "ok":
        return cells + [f"{res['status']}: {res['note']}", "", "", ""]
    s = res["loop_s"]
    return cells + [
        f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})",
        f"{res['step_ms']:.1f}",
        f"{res['images_per_s']:.3g}",
        _fmt_ratio(res),
    ]


def _text_table(header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _preamble(result: dict[str, Any]) -> list[str]:
    s, m, dev = result["settings"], result["model"], result["device"]
    where = f"{dev['name']} ({dev['threads']} threads)" if dev["type"] == "cpu" else dev["name"]
    peak = result["peak"]
    if dev["type"] == "cpu":
        peak_line = "MFU: n/a on a CPU (no peak table)"
    elif s["peak_tflops"]:
        peak_line = f"MFU against --peak-tflops {s['peak_tflops']:g}"
    elif peak["table"]:
        t = peak["table"]
        peak_line = f"MFU against {peak['gpu']}: bf16 {t['bf16']}, fp16 {t['fp16']}, fp32 {t['fp32']} TFLOP/s"
    else:
        peak_line = "MFU: n/a (GPU not in the peak table; pass --peak-tflops)"
    return [
        f"{m['name']}, input {s['input_size']}x{s['input_size']}x{s['in_channels']} ({m['tokens']} tokens), "
        f"{s['num_classes']} classes, batch {s['batch_size']}, on {where}, torch {result['torch']}, {result['date']}",
        f"FLOPs per training image = 3 x 2 x {m['forward_gmacs_per_image']:.3f} forward GMACs (model_stats) "
        f"= {m['train_flops_per_image'] / 1e9:.2f} GFLOP (model FLOPs: a grad-checkpointing recompute is not counted)",
        peak_line,
        f"peak TFLOP/s table: {peak['source']}" if dev["type"] == "cuda" else "",
        f"timing: {s['warmup']} untimed warm-up step(s), then {s['repeats']} repeats x {s['iters']} step(s)"
        + (", rows interleaved (ABBA)" if s["interleave"] else ", one row at a time")
        + "; median per step, [interquartile range], (min-max)",
        f"peak mem: {result['memory_kind']}",
        f"load average (1, 5, 15 min) at start: {result['load_average_start']}"
        + (f", at end: {result['load_average_end']}" if result.get("load_average_end") else ""),
    ]


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables printed at the end of a run."""
    lines = [line for line in _preamble(result) if line]
    if result["training"]:
        lines += ["", "Training step (forward + backward + AdamW + EMA):"]
        lines.append(_text_table(TRAIN_COLUMNS, [training_cells(r) for r in result["training"]]))
    if result["sampling"]:
        s = result["settings"]
        lines += ["", f"Sampling (images/s of final samples; model batch {2 * s['sample_batch']} with CFG):"]
        lines.append(_text_table(SAMPLE_COLUMNS, [sampling_cells(r) for r in result["sampling"]]))
    lines += [f"note: {n}" for n in result["notes"]]
    for r in result["training"]:
        if r.get("profile"):
            lines += ["", f"torch.profiler, {r['name']}, top ops:", r["profile"]]
    if result.get("wall_s") is not None:
        lines.append(f"wall time: {result['wall_s']:.1f} s (process start to end, imports included)")
    warning = noise_warning(result)
    return "\n".join(lines + ([warning] if warning else []))


def format_markdown(result: dict[str, Any]) -> str:
    """The same tables as markdown (for benchmarks/results/*.md)."""
    m = result["model"]
    lines = [f"### {m['name']}, batch {result['settings']['batch_size']}", ""]
    if result["command"]:
        lines += [f"`{result['command']}`", ""]
    lines += [f"- {line}" for line in _preamble(result) if line]
    if result["training"]:
        lines += ["", _md_table(TRAIN_COLUMNS, [training_cells(r) for r in result["training"]])]
    if result["sampling"]:
        lines += ["", _md_table(SAMPLE_COLUMNS, [sampling_cells(r) for r in result["sampling"]])]
    if result["notes"]:
        lines += [""] + [f"- note: {n}" for n in result["notes"]]
    if noise_warning(result):
        lines += ["", f"- **{noise_warning(result)}**"]
    syncs = {r["name"]: r["host_syncs_per_step"] for r in result["training"] if "host_syncs_per_step" in r}
    if syncs:
        lines += ["", f"- synchronising CUDA calls per step (forward/loss/optimizer thread): {syncs}"]
    for r in result["training"]:
        if r.get("profile"):
            lines += ["", f"<details><summary>torch.profiler: {r['name']}, top ops</summary>", "", "```"]
            lines += [r["profile"], "```", "", "</details>"]
    if result.get("wall_s") is not None:
        lines += ["", f"- wall time: {result['wall_s']:.1f} s (imports included)"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], json_path: str | None, markdown_path: str | None) -> None:
    """Write the JSON and markdown outputs (each atomically: a reader never sees half a file)."""
    outputs = {json_path: lambda: json.dumps(result, indent=2), markdown_path: lambda: format_markdown(result)}
    for path, text in outputs.items():
        if path:
            tmp = Path(f"{path}.tmp")
            tmp.write_text(text())
            tmp.replace(path)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m minidit.bench",
        description="Benchmark the DiT training step and sampler against the reference recipe.",
        epilog="Defaults marked 'auto' depend on the device (CUDA or CPU) and --quick; see the module docstring.",
    )
    p.add_argument("--model", default=None, help="auto: DiT-XL/2 on CUDA, DiT-S/4 on CPU, DiT-Ti/4 with --quick")
    p.add_argument("--input-size", type=int, default=None, help="latent/pixel side I (auto: 32; 16 with --quick)")
    p.add_argument("--in-channels", type=int, default=4, help="4 for SD-VAE latents, 3 for pixels")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None, help="per step (auto: CUDA 64, or 32 for XL/L on < 100 GiB)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="minidit row (auto: CUDA bf16, CPU fp32)")
    p.add_argument("--attn", choices=ATTN_BACKENDS, default="sdpa", help="minidit row's attention backend")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="auto: on for CUDA")
    p.add_argument("--grad-checkpointing", action="store_true", help="minidit row: gradient checkpointing")
    p.add_argument("--configs", default=None, help="sweep, e.g. 'ref,bf16,bf16+sdpa,bf16+sdpa+compile'")
    p.add_argument("--iters", type=int, default=None, help="steps per timed repeat (auto: CUDA 10, CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (auto: CUDA 3, CPU 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None, help="auto: on for CPU")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True, help="time the training step")
    p.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=True, help="time sampling")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling loop (auto: CUDA 32, CPU 2)")
    p.add_argument("--ddpm-steps", type=int, default=None, help="auto: 250 (10 with --quick)")
    p.add_argument("--ddim-steps", type=int, default=None, help="auto: 50 (5 with --quick)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (> 1: the batch is doubled)")
    p.add_argument("--sample-repeats", type=int, default=None, help="timed loops per sampler (auto: 3, CPU 1)")
    p.add_argument("--vae-in-loop", action="store_true", help="encode images inside every step (all rows)")
    p.add_argument("--vae", default=None, help="AutoencoderKL directory for --vae-in-loop (default: tiny stand-in)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="a small, fast run (CPU: < 1 min)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak TFLOP/s for MFU")
    p.add_argument("--profile-below", type=float, metavar="MFU", help="profile the headline row if its MFU < this")
    p.add_argument("--json", default=None, help="write all settings, results and raw timings here")
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")
    p.add_argument("--seed", type=int, default=0)
    return p


def default_batch_size(model: str, device: torch.device) -> int:
    """The CUDA default: 64 per GPU, 32 for the L/XL models on GPUs under 100 GiB (a ref-2023 row
    is fp32 with math attention: its [B, H, T, T] attention maps are kept for the backward)."""
    if device.type != "cuda":
        return 16
    big = model.split("/")[0] in ("DiT-L", "DiT-XL")
    return 32 if big and torch.cuda.get_device_properties(device).total_memory < 100 * 2**30 else 64


def resolve(args: argparse.Namespace) -> tuple[Spec, list[RowConfig]]:
    """Fill in the device- and --quick-dependent defaults and check every value (UserError if bad)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible")
    cuda, quick = device.type == "cuda", args.quick

    def pick(value, cuda_default, cpu_default, quick_default=None):
        if value is not None:
            return value
        if quick and quick_default is not None:
            return quick_default
        return cuda_default if cuda else cpu_default

    model = pick(args.model, "DiT-XL/2", "DiT-S/4", "DiT-Ti/4")
    if model not in MODELS:
        raise UserError(f"--model {model!r}: unknown; choose one of {', '.join(MODELS)}")
    spec = Spec(
        model=model,
        input_size=pick(args.input_size, 32, 32, 16),
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        batch_size=pick(args.batch_size, default_batch_size(model, device), 16, 8),
        device=str(device),
        warmup=pick(args.warmup, 3, 1, 1),
        iters=pick(args.iters, 10, 2, 2),
        repeats=args.repeats,
        interleave=pick(args.interleave, False, True),
        quick=quick,
        training=args.training,
        sampling=args.sampling,
        sample_batch=pick(args.sample_batch, 32, 2, 2),
        ddpm_steps=pick(args.ddpm_steps, 250, 250, 10),
        ddim_steps=pick(args.ddim_steps, 50, 50, 5),
        cfg_scale=args.cfg_scale,
        sample_repeats=pick(args.sample_repeats, 3, 1, 1),
        vae_in_loop=args.vae_in_loop or bool(args.vae),
        vae=args.vae,
        peak_tflops=args.peak_tflops,
        profile_below=args.profile_below,
        seed=args.seed,
    )
    for name in ("input_size", "in_channels", "num_classes", "batch_size", "iters", "repeats", "sample_batch"):
        if getattr(spec, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(spec, name)}")
    if spec.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {spec.warmup}")
    if spec.input_size % spec.patch_size:
        raise UserError(f"--input-size {spec.input_size} is not divisible by {model}'s patch size {spec.patch_size}")
    for name in ("ddpm_steps", "ddim_steps"):
        if not 1 <= getattr(spec, name) <= 1000:
            raise UserError(f"--{name.replace('_', '-')} must be in 1..1000, got {getattr(spec, name)}")
    if spec.sample_repeats < 1:
        raise UserError(f"--sample-repeats must be at least 1, got {spec.sample_repeats}")
    if spec.peak_tflops is not None and spec.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be positive, got {spec.peak_tflops}")
    if spec.vae and spec.in_channels != 4:
        raise UserError("--vae needs a latent model: --in-channels 4")
    for path in (args.json, args.markdown):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: the directory does not exist")

    if args.configs is not None:
        rows = parse_configs(args.configs, device)
    else:
        defaults = minidit_defaults(device)
        row = RowConfig(
            "minidit",
            precision=args.precision or defaults["precision"],
            attn=args.attn,
            compile=defaults["compile"] if args.compile is None else args.compile,
            grad_checkpointing=args.grad_checkpointing,
            optimizer=optimizer_kind(device),
            ema="foreach",
        )
        rows = [reference_row(device), row]
    if spec.warmup < 1 and any(r.compile for r in rows):
        raise UserError("compiled rows need --warmup >= 1 (the first step compiles)")
    return spec, rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    spec, rows = resolve(args)
    command = "python -m minidit.bench " + " ".join(argv)

    def on_update(result: dict[str, Any]) -> None:  # partial outputs survive a timeout
        write_outputs(result, args.json, args.markdown)

    result = run_benchmark(spec, rows, command=command, on_update=on_update, log=lambda s: print(s, flush=True))
    print()
    print(format_report(result), flush=True)
    failed = [r["name"] for r in result["training"] + result["sampling"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
