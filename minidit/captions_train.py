"""Training, export and evaluation of the caption DiTs of ``minidit.captions`` (its command line runs these).

A run directory holds ``checkpoints/last.pt`` (model, EMA, optimizer, step, config; written atomically every 500
steps and at the end, resumed from when present) and ``log.jsonl`` (the loss every 100 steps). Step ``k`` trains
on the captioned images ``k * B ... (k + 1) * B - 1`` of the run's data seed (``make_batch(...,
train_split=True)``: the held-out combinations never appear) and draws its flow times, noise and caption drops
from ``runtime.step_generator(seed, k)``; the step itself is ``minidit.train.train_step`` (AdamW, the EMA).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import captions as C
from .errors import UserError

STEPS = 4000
SAVE_EVERY = 500
HELD_OUT_START = 1 << 40  # the classifier trains on indices below this and is tested above it
EVAL_DATA_SEED = 1  # where evaluation draws its captions (the attribute combinations, not the images)


def _config(arch: str, steps: int, batch_size: int, seed: int) -> dict:
    return {"arch": arch, **C.MODEL_CONFIGS[arch], "max_len": C.MAX_LEN, "caption_dropout_prob": 0.1,
            "objective": "flow", "t_sampling": "uniform", "steps": steps, "batch_size": batch_size, "seed": seed,
            "lr": 1e-3, "warmup_steps": 200, "ema_decay": 0.995, "held_out_combos": C.HELD_OUT_COMBOS}  # fmt: skip


def train(run_dir: str | os.PathLike, arch: str = "pixart", steps: int = STEPS, batch_size: int = 64,
          seed: int = 0) -> dict:  # fmt: skip
    """Train (or resume) a caption DiT in ``run_dir`` with flow matching. Returns {"step", "loss", "seconds", ...}.
    A run directory another trainer is writing is refused (``rundir.lock``, as ``python -m minidit.train``)."""
    from .rundir import lock, make_writable_dir, unlock

    fd = lock(Path(run_dir))
    try:
        make_writable_dir(Path(run_dir) / "checkpoints")
        return _train_locked(Path(run_dir), arch, steps, batch_size, seed)
    finally:
        unlock(fd)


def _train_locked(run_dir: Path, arch: str, steps: int, batch_size: int, seed: int) -> dict:
    from tqdm import tqdm

    from .checkpoint import read_file, save_checkpoint
    from .flow import FlowMatching
    from .runtime import step_generator
    from .train import make_optimizer, train_step

    ckpt = run_dir / "checkpoints" / "last.pt"
    cfg = _config(arch, steps, batch_size, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = C.model_from_config(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), cfg["lr"], 0.0, torch.device("cpu"))
    start = 0
    if ckpt.is_file():
        state = read_file(ckpt)
        if not isinstance(state.get("config"), dict) or not {"model", "ema", "opt", "step"} <= set(state):
            raise UserError(f"{ckpt} is not a caption DiT checkpoint; it is left in place: pass another --run-dir")
        old = {k: v for k, v in state["config"].items() if k != "steps"}
        new = json.loads(json.dumps({k: v for k, v in cfg.items() if k != "steps"}))  # tuples -> lists
        if old != new:
            raise UserError(f"{run_dir} holds a different run ({old}); pass another --run-dir")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        if start >= steps:
            raise UserError(f"{run_dir} already finished {start} steps; pass a larger --steps to train further")
    objective = FlowMatching(t_sampling=cfg["t_sampling"])

    def net(x, t, y, force_drop_ids):  # train_step passes the caption tokens as ``y``
        return model(x, t, y, force_drop_ids)

    def save(step: int) -> None:
        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step, "config": json.loads(json.dumps(cfg))}, ckpt)  # fmt: skip

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training caption DiT ({arch}, {n_params / 1e6:.2f}M params) on toy captions 16x16, cpu, "
        f"{torch.get_num_threads()} thread(s), batch {batch_size}, step {start} -> {steps}, run dir {run_dir}"
    )
    began, loss_sum, seen = time.perf_counter(), 0.0, 0
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step")
    with open(run_dir / "log.jsonl", "a") as log:
        for step in bar:
            images, captions, _ = C.make_batch(torch.arange(step * batch_size, (step + 1) * batch_size), seed,
                                               cfg["image_size"], train_split=True)  # fmt: skip
            g = step_generator(seed, step)
            t = objective.sample_timesteps(batch_size, g)
            noise = torch.randn(images.shape, generator=g)
            drop = (torch.rand(batch_size, generator=g) < cfg["caption_dropout_prob"]).long()
            lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"])
            sums = train_step(net, model, ema, opt, objective, [(images, C.tokenize(captions), t, noise, drop)],
                              accum=1, lr=lr, ema_decay=cfg["ema_decay"])  # fmt: skip
            loss_sum, seen = loss_sum + sums[0].item(), seen + batch_size
            if not math.isfinite(loss_sum):
                raise UserError(f"the loss became non-finite at step {step}; the last checkpoint is kept in {ckpt}")
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log.write(json.dumps({"step": step + 1, "loss": loss_sum / seen}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                last_loss, loss_sum, seen = loss_sum / seen, 0.0, 0
            if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
                save(step + 1)
    bar.close()
    seconds = time.perf_counter() - began
    return {"step": steps, "loss": last_loss, "seconds": seconds,
            "checkpoint": str(ckpt), "params": n_params}  # fmt: skip


def export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a run's EMA weights to a small safetensors file (fp16; the fixed ``pos_embed`` fp32), its config
    and step in the metadata. Default ``data/toy_{arch}.safetensors``."""
    from safetensors.torch import save_file

    from .checkpoint import CheckpointError, read_file
    from .fileio import atomic_write

    try:
        state = read_file(Path(run_dir) / "checkpoints" / "last.pt")
        cfg, ema, step = state["config"], state["ema"], int(state["step"])
        if not isinstance(cfg, dict) or cfg.get("arch") not in C.ARCHS:
            raise ValueError("its config names no caption DiT arch: a run of another trainer?")
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{run_dir}: not a caption DiT run directory ({str(e).splitlines()[0]})") from None
    out = Path(out) if out is not None else C.shipped_path(cfg["arch"])
    tensors = {k: (v if k == "pos_embed" else v.half()).contiguous() for k, v in ema.items()}
    meta = {"format": "minidit caption DiT", "config": json.dumps({**cfg, "trained_steps": step}, sort_keys=True)}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return out


def train_classifier(out: str | os.PathLike = C.DEFAULT_CLASSIFIER, steps: int = 800, batch_size: int = 128,
                     seed: int = 0, image_size: int = 16, held_out: int = 5000) -> dict:  # fmt: skip
    """Train a ``CaptionClassifier`` on fresh captioned images (rotations up to +-30 degrees) lightly damaged by
    ``toy.augment`` (contrast, blur, noise), summed cross-entropy over the four heads; save it to ``out``.
    Returns {"accuracy": {attribute: held-out accuracy}, "seconds", "path"} (``held_out`` images from
    ``HELD_OUT_START`` on, never trained on)."""
    from tqdm import tqdm

    from .checkpoint import save_checkpoint
    from .toy import augment

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        classifier = C.CaptionClassifier(image_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    began = time.perf_counter()
    classifier.train()
    bar = tqdm(range(steps), desc="caption classifier", unit="step")
    for step in bar:
        indices = torch.arange(step * batch_size, (step + 1) * batch_size)
        images, _, attrs = C.make_batch(indices, seed, image_size, max_rotation=C.CLASSIFIER_MAX_ROTATION)
        logits = classifier(augment(images, generator))
        loss = sum(F.cross_entropy(logits[name], attrs[name]) for name in C.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    classifier.eval()
    images, _, attrs = C.make_batch(torch.arange(HELD_OUT_START, HELD_OUT_START + held_out), seed, image_size)
    accuracy = C.score(images, attrs, classifier)
    save_checkpoint(classifier.state_dict(), out)
    return {"accuracy": accuracy, "held_out": held_out, "seconds": time.perf_counter() - began, "path": str(out)}


def evaluation_attrs(n: int, per_held_out: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The captions evaluation asks for: (n random attribute combinations from data seed ``EVAL_DATA_SEED``,
    ``per_held_out`` of each held-out combination), each as {attribute: int64 [N]}."""
    _, _, attrs = C.make_batch(torch.arange(HELD_OUT_START, HELD_OUT_START + n), EVAL_DATA_SEED)
    held = C._HELD_OUT_IDS.repeat_interleave(per_held_out, dim=0)  # [6 * per_held_out, 4]
    return attrs, {name: held[:, k] for k, name in enumerate(C.ATTRIBUTES)}


def evaluate(model: C.CaptionDiT, n: int = 200, per_held_out: int = 20, cfg_scale: float = 4.0, steps: int = 20,
             seed: int = 0, classifier=None) -> dict:  # fmt: skip
    """Per-attribute accuracy (``score``) of ``n`` samples of random captions and of samples of the held-out
    combinations: {"random": {attribute: accuracy, "all": ...}, "held_out": {...}, "seconds"}."""
    classifier = classifier or C.load_caption_classifier()
    began = time.perf_counter()
    result = {}
    for name, attrs in zip(("random", "held_out"), evaluation_attrs(n, per_held_out)):
        images = C.generate(model, C.captions_of(attrs), cfg_scale=cfg_scale, steps=steps, seed=seed)
        result[name] = C.score(images, attrs, classifier)
    return {**result, "seconds": time.perf_counter() - began}


def _percent(scores: dict) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in scores.items())


def run_command(args) -> int:
    """The work of ``python -m minidit.captions COMMAND`` (parsed there)."""
    from .toy import check_writable, save_grid

    if args.command == "train":
        result = train(args.run_dir or f"runs/captions-{args.arch}", args.arch, args.steps, args.batch_size, args.seed)
        print(f"trained to step {result['step']} in {result['seconds']:.0f} s (last loss {result['loss']:.4f}); "
              f"checkpoint {result['checkpoint']}")  # fmt: skip
    elif args.command == "export":
        if args.out is not None:
            check_writable(args.out)
        out = export(args.run_dir, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): EMA weights of {args.run_dir}, fp16")
    elif args.command == "eval":
        model, cfg = C.load_caption_dit(args.arch, args.ckpt)
        for scale in args.cfg_scale:
            r = evaluate(model, args.n, args.per_held_out, scale, args.steps, args.seed)
            print(f"{args.arch} CFG {scale:g}, {args.steps} Euler steps, seed {args.seed} ({r['seconds']:.0f} s):")
            print(f"  {args.n} random captions: {_percent(r['random'])}")
            print(f"  {args.per_held_out} x {len(C.HELD_OUT_COMBOS)} held-out combinations: {_percent(r['held_out'])}")
    elif args.command == "train-classifier":
        check_writable(args.out)
        r = train_classifier(args.out, args.steps, seed=args.seed)
        print(f"held-out accuracy on {r['held_out']} images: {_percent(r['accuracy'])}; wrote {r['path']} "
              f"({os.path.getsize(r['path']) / 1024:.0f} KB) in {r['seconds']:.0f} s")  # fmt: skip
    else:
        check_writable(args.out)
        if args.arch is None:
            images, captions, _ = C.make_batch(torch.arange(16), args.seed)
        else:
            captions = args.caption or C.make_batch(torch.arange(16), EVAL_DATA_SEED)[1]
            tokens = C.tokenize(captions)  # a bad caption fails before the model loads
            model, _ = C.load_caption_dit(args.arch)
            images = C.generate(model, tokens, cfg_scale=args.cfg_scale, seed=args.seed)
        save_grid(images, args.out, nrow=8, scale=6)
        print(f"wrote {args.out}: " + "; ".join(f"{i}: {c}" for i, c in enumerate(captions)))
    return 0
