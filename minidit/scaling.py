"""Loss and sample quality against compute: the paper's scaling sweep at toy scale (section 4, Table 1, Figure 9).

The paper trains DiT-S/B/L/XL at patch 8, 4, 2 for the same steps: FID follows the forward Gflops, not the
parameters (a smaller patch at the same parameters helps as much as a bigger model). This repeats it on the toy
shapes (16 px) with the trainer's toy recipe and step (``train.train_step``) for DiTs named ``wW-dD-pP`` (width W,
depth D, patch P, W / 32 heads), recording params, forward Gflops per image (``stats.model_stats``: MACs, the
paper's unit), tokens, the training loss (last 10% of steps), a held-out loss (EMA weights, fixed unseen images,
evenly spaced t, seeded noise: far less noisy), the toy classifier's accuracy on CFG-4 samples and wall time::

    python -m minidit.scaling run --steps 1200 --out benchmarks/results/scaling-2026-12-01.json  # resumable
    python -m minidit.scaling plot benchmarks/results/scaling-2026-12-01.json --out scaling.png
    python -m minidit.scaling report benchmarks/results/scaling-2026-12-01.json
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config, toy
from .bench import describe_device
from .errors import ArgumentParser, UserError, positive_int, run_cli
from .evaluate import toy_metrics
from .fileio import read_json, write_json, write_text
from .model import DiT
from .runtime import available_cpus, cpu_threads, dist_from_env
from .sample import generate
from .stats import model_stats
from .train import ToyBatches, make_objective, make_optimizer, step_noise, train_step, warmup_lr

#: The default sweep: pairs at equal params and different patch (Gflops x4 per halving), and pairs at similar
#: Gflops with params 4-13x apart (w64-d4-p2 / w128-d4-p4 / w192-d6-p8; w64-d2-p2 / w128-d2-p4).
DEFAULT_CONFIGS = "w64-d2-p4,w64-d2-p2,w64-d4-p2,w128-d2-p4,w128-d4-p8,w128-d4-p4,w128-d4-p2,w192-d6-p8"
HELDOUT_IMAGES, HELDOUT_FIRST_INDEX = 256, 2**40  # toy image indices no training run reaches
CFG_SCALE = 4.0


def parse_config(name: str) -> dict[str, int]:
    """``"w128-d4-p2"`` -> {"hidden_size": 128, "depth": 4, "patch_size": 2, "num_heads": 4} (W / 32 heads)."""
    m = re.fullmatch(r"w(\d+)-d(\d+)-p(\d+)", name)
    if not m:
        raise UserError(f"config {name!r}: expected wWIDTH-dDEPTH-pPATCH, e.g. w128-d4-p2")
    width, depth, patch = map(int, m.groups())
    if width % 32 or width == 0 or depth == 0 or patch == 0 or 16 % patch:
        raise UserError(f"config {name!r}: the width must be a multiple of 32 and the patch divide 16")
    return dict(hidden_size=width, depth=depth, patch_size=patch, num_heads=width // 32)


def build(name: str, cfg: config.TrainConfig) -> DiT:
    """The DiT ``name`` for the toy data (16 px RGB, 10 classes) with the recipe's label dropout."""
    return DiT(input_size=cfg.image_size, in_channels=3, num_classes=toy.NUM_CLASSES, learn_sigma=cfg.learn_sigma,
               class_dropout_prob=cfg.class_dropout_prob, **parse_config(name))  # fmt: skip


def recipe(seed: int = 0) -> config.TrainConfig:
    """The trainer's toy preset (cosine schedule, lr 2e-3 after 200 warm-up steps, batch 64, EMA 0.995, ...)."""
    return config.build_config("toy", {"seed": seed})


@torch.no_grad()
def heldout_loss(ema: DiT, cfg: config.TrainConfig, diffusion) -> tuple[float, float]:
    """(loss, mse) of ``ema`` on HELDOUT_IMAGES unseen toy images at evenly spaced t with seeded noise."""
    x, y = toy.make_batch(torch.arange(HELDOUT_IMAGES) + HELDOUT_FIRST_INDEX, seed=cfg.seed, image_size=cfg.image_size)
    t = torch.arange(HELDOUT_IMAGES) * diffusion.num_timesteps // HELDOUT_IMAGES
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    losses = diffusion.training_losses(ema.eval(), x, t, model_kwargs=dict(y=y), noise=noise)
    return losses["loss"].mean().item(), losses["mse"].mean().item()


def train_config(name: str, steps: int, cfg: config.TrainConfig, eval_samples: int, progress: bool = True) -> dict:
    """Train ``name`` for ``steps`` steps on the toy data with the trainer's step; evaluate; return its row."""
    from tqdm.auto import tqdm

    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    device, G = torch.device("cpu"), cfg.global_batch_size
    torch.manual_seed(cfg.seed)
    model = build(name, cfg)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay, device)
    diffusion = make_objective(cfg)
    batches = iter(ToyBatches(cfg, dist_from_env(), micro=G, accum=1, start_step=0))
    tail, chunk = max(1, steps // 10), max(1, steps // 20)  # loss: mean of the last 10%; curve: 20 points
    losses = torch.zeros(steps)
    model.train()
    for step in tqdm(range(steps), desc=name, disable=not progress, dynamic_ncols=True, leave=False):
        x, y = next(batches)
        t, noise, drop, _, _ = step_noise(cfg, diffusion, tuple(x.shape), step, device)  # the trainer's draws
        sums = train_step(model, model, ema, opt, diffusion, [(x, y, t, noise, drop)], accum=1,
                          lr=warmup_lr(cfg, step), ema_decay=cfg.ema_decay)  # fmt: skip
        losses[step] = sums[0] / G
    if not torch.isfinite(losses).all():
        raise UserError(f"{name}: the loss became NaN/inf at step {int((~torch.isfinite(losses)).nonzero()[0])}")
    train_s = time.perf_counter() - t0
    held, held_mse = heldout_loss(ema, cfg, diffusion)
    labels = torch.arange(eval_samples) % toy.NUM_CLASSES
    images = generate(ema, labels, cfg_scale=CFG_SCALE, num_steps=cfg.sample_steps, seed=cfg.seed + 2,
                      noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps,
                      clip_denoised=True)  # fmt: skip
    metrics = toy_metrics(images, labels, toy.load_classifier(image_size=cfg.image_size))
    stats = model_stats(model)
    return {
        "name": name, **parse_config(name), "params": stats.params, "tokens": stats.tokens, "gflops": stats.gmacs,
        "train_loss": losses[-tail:].mean().item(), "heldout_loss": held, "heldout_mse": held_mse,
        "accuracy_cfg4": metrics["accuracy"], "frechet_toy": metrics["frechet_toy"], "eval_samples": eval_samples,
        "loss_curve": [round(v, 5) for v in losses[: chunk * (steps // chunk)].view(-1, chunk).mean(1).tolist()],
        "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip


def run(names: list[str], steps: int, out: Path, seed: int, eval_samples: int, command: str, progress=True) -> dict:
    """Train every config of ``names`` missing from ``out`` (read first if it exists), rewriting ``out`` after each."""
    cfg = recipe(seed)
    settings = {"steps": steps, "seed": seed, "eval_samples": eval_samples}
    if out.exists():
        result = read_json(out, hint="pass --out NEW.json for a new sweep")
        if result.get("settings") != settings:
            raise UserError(f"{out} holds a sweep with {result.get('settings')}, not {settings}; "
                            "pass the same settings to resume, or --out NEW.json")  # fmt: skip
    else:
        cores = available_cpus()
        result = {"command": command, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "machine": describe_device(torch.device("cpu")), "cores": cores, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "settings": settings,
                  "recipe": {k: getattr(cfg, k) for k in ("image_size", "noise_schedule", "lr", "warmup_steps",
                             "global_batch_size", "ema_decay", "learn_sigma", "class_dropout_prob", "sample_steps")},
                  "runs": []}  # fmt: skip
    done = {r["name"] for r in result["runs"]}
    for name in names:
        if name in done:
            print(f"{name}: already in {out}, skipped")
            continue
        row = train_config(name, steps, cfg, eval_samples, progress)
        result["runs"].append(row)
        write_json(out, result)
        print(f"{name}: {row['params']:,} params, {row['gflops']:.4f} Gflops, held-out loss {row['heldout_loss']:.4f}, "
              f"accuracy {row['accuracy_cfg4']:.0%}, {row['wall_s']:.0f} s (load {row['load_average']})")  # fmt: skip
    return result


def fit_power_law(x, y) -> tuple[float, float]:
    """(a, b) of y ~= a * x**b, by least squares on log y = log a + b log x. x, y: [N] positive, N >= 2."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2 or (x <= 0).any() or (y <= 0).any():
        raise UserError("fit_power_law needs two equally long lists of at least 2 positive numbers")
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def spearman(x, y) -> float:
    """Rank correlation of x and y (no ties expected)."""
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


#: The committed sweep (benchmarks/results/, next to the package in a checkout; absent from a wheel).
COMMITTED_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "scaling-2026-12-01.json"


def load_results(path: str | Path | None = None) -> dict[str, Any]:
    """A results file of ``python -m minidit.scaling run``; by default the committed sweep (COMMITTED_RESULTS)."""
    if path is None:
        path = COMMITTED_RESULTS
        if not path.is_file():
            raise UserError(f"{path} is missing: the committed sweep ships with the repository, not with a wheel; "
                            "clone https://github.com/minidit/minidit or pass the path of a results file")  # fmt: skip
    result = read_json(path, hint="expected a results file of `python -m minidit.scaling run`")
    if not isinstance(result.get("runs"), list) or not result["runs"]:
        raise UserError(f"{path}: holds no runs of `python -m minidit.scaling run`")
    return result


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Fitted exponents and rank correlations of the held-out loss against Gflops and against params."""
    runs = result["runs"]
    g, p, loss = ([r[k] for r in runs] for k in ("gflops", "params", "heldout_loss"))
    out = {"spearman_gflops": spearman(g, loss), "spearman_params": spearman(p, loss)}
    if len(runs) >= 2:
        out["exponent_gflops"] = fit_power_law(g, loss)[1]
        out["exponent_params"] = fit_power_law(p, loss)[1]
    return out


def report(result: dict[str, Any]) -> str:
    """The sweep as a markdown table, with the fits."""
    lines = [f"`{result['command']}` ({result['date']}; {result['machine']}, torch {result['torch']}, "
             f"{result['settings']['steps']} steps each)", "",
             "| config | params | tokens | Gflops | train loss | held-out loss | accuracy (CFG 4) | wall s | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in sorted(result["runs"], key=lambda r: r["gflops"]):
        lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens']} | {r['gflops']:.4f} | {r['train_loss']:.4f} "
                     f"| {r['heldout_loss']:.4f} | {r['accuracy_cfg4']:.0%} | {r['wall_s']:.0f} "
                     f"| {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f} |")  # fmt: skip
    loads = [x for r in result["runs"] for x in r["load_average"]]
    busy = "busy" if max(loads) >= result.get("cores", 1) else "idle"
    lines += ["", f"Machine {busy}: 1-minute load average {min(loads):.1f}–{max(loads):.1f} on "
              f"{result.get('cores', '?')} cores, {result.get('threads', '?')} thread(s)."]  # fmt: skip
    s = summary(result)
    lines += ["", f"Spearman rank correlation of the held-out loss with Gflops {s['spearman_gflops']:+.2f}, "
              f"with params {s['spearman_params']:+.2f}."]  # fmt: skip
    if "exponent_gflops" in s:
        lines.append(f"Power-law fits: held-out loss ∝ Gflops^{s['exponent_gflops']:.3f}, "
                     f"∝ params^{s['exponent_params']:.3f}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: str | Path) -> Path:
    """Held-out (and training) loss against Gflops and against params (log x), and accuracy against Gflops."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    runs = sorted(result["runs"], key=lambda r: r["gflops"])
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    panels = (("gflops", "heldout_loss", "forward Gflops per image"), ("params", "heldout_loss", "parameters"),
              ("gflops", "accuracy_cfg4", "forward Gflops per image"))  # fmt: skip
    for ax, (xk, yk, xlabel) in zip(axes, panels):
        xs, ys = [r[xk] for r in runs], [r[yk] for r in runs]
        ax.scatter(xs, ys, zorder=3)
        if yk == "heldout_loss":
            ax.scatter(xs, [r["train_loss"] for r in runs], facecolors="none", edgecolors="grey", label="train loss")
            if len(runs) >= 2:
                a, b = fit_power_law(xs, ys)
                grid = np.geomspace(min(xs), max(xs), 50)
                ax.plot(grid, a * grid**b, "--", color="C1", label=f"fit ∝ x^{b:.3f}")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        for r, xv, yv in zip(runs, xs, ys):
            ax.annotate(r["name"], (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # (labels on every minor tick overlap)
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"heldout_loss": "held-out loss (EMA)", "accuracy_cfg4": "toy accuracy, CFG 4"}[yk])
        ax.grid(alpha=0.3)
    fig.suptitle(f"toy DiTs, {result['settings']['steps']} steps each: loss follows Gflops, not params?", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="python -m minidit.scaling", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train the sweep (resumes: configs already in --out are skipped)")
    p.add_argument("--steps", type=positive_int, default=1200)
    p.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after every config")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated wW-dD-pP (default {DEFAULT_CONFIGS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=positive_int, default=100, help="CFG-4 samples for the toy accuracy")
    p = sub.add_parser("plot", help="loss vs Gflops and vs params, accuracy vs Gflops (PNG)")
    p.add_argument("results")
    p.add_argument("--out", default="scaling.png")
    p = sub.add_parser("report", help="the sweep as a markdown table")
    p.add_argument("results")
    p.add_argument("--out", help="write the table here too")
    args = parser.parse_args(argv)
    if args.command == "run":
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        for name in names:
            parse_config(name)
        if not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(cpu_threads(0, 1)[0])
        run(names, args.steps, args.out, args.seed, args.eval_samples, "python -m minidit.scaling " + " ".join(argv))
    elif args.command == "plot":
        print(plot(load_results(args.results), args.out))
    else:
        text = report(load_results(args.results))
        print(text, end="")
        if args.out:
            write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
