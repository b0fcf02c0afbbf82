"""Training configurations: one dataclass of defaults, four named presets, ``--key value`` overrides.

    python -m minidit.train                                   # --config toy: 2 CPU cores, minutes
    python -m minidit.train --config cifar10                  # one GPU, pixel space
    torchrun --nproc_per_node 8 -m minidit.train --config imagenet256-xl2 --data-path data/latents/imagenet256

Every field of ``TrainConfig`` can be overridden on the command line as
``--field value`` (or ``--field=value``; dashes and underscores are the same).
Unknown fields, bad values and impossible combinations fail before any work,
in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import UserError, closest
from .model import MODELS


@dataclass
class TrainConfig:
    # -- data ----------------------------------------------------------------------------
    data: str = "toy"  # toy | cifar10 | folder | latents
    data_path: str | None = None  # folder of class subfolders, or a latent directory from extract_latents
    data_root: str = "data"  # where CIFAR-10 is downloaded
    image_size: int = 32  # pixels; latent models use image_size / 8
    num_classes: int | None = None  # None: from the dataset
    num_workers: int = 0  # DataLoader workers (real datasets)
    latent_sampling: str = "fresh"  # latents: fresh (a posterior sample per image and step) | frozen (stored ones)
    hflip: bool = True  # random horizontal flips of the training images (real datasets), as the reference
    # -- model -----------------------------------------------------------------------------
    model: str = "DiT-Ti/4"
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    attn_backend: str = "sdpa"  # sdpa | math | flash_attn
    grad_checkpointing: bool = False
    compile: bool = False
    # -- diffusion -------------------------------------------------------------------------
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    # -- optimisation (the reference: AdamW, constant lr 1e-4, no weight decay, EMA 0.9999) -
    global_batch_size: int = 64
    micro_batch_size: int | None = None  # per process and step; None: global / world size (no accumulation)
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: off, like the reference
    max_steps: int = 1000
    ema_decay: float = 0.9999
    # auto: bf16 on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    tf32: bool = True
    # -- bookkeeping -----------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    run_dir: str | None = None  # None: runs/<config>
    log_every: int = 10
    ckpt_every: int = 250
    ckpt_keep_every: int = 0  # also keep step_XXXXXXX.pt every N steps (0: only last.pt)
    sample_every: int = 500  # sample grid during training (0: only at the end)
    samples_per_class: int = 6  # columns of the sample grid
    sample_classes: str = ""  # comma-separated class ids for the grid rows ("": all, at most 16)
    sample_steps: int = 100  # DDPM steps (respaced) for grids and evaluation
    cfg_scale: float = 4.0  # guidance scale for grids and evaluation
    eval_samples: int = 200  # final evaluation: samples to classify (toy data only; 0: skip)
    vae: str = "ema"  # latent models: VAE used to decode grids (ema | mse | toy | a local directory)


#: One line per field for ``--help`` (tests check that every field has one).
HELP: dict[str, str] = {
    "data": "what to train on: toy (shapes drawn on the fly) | cifar10 | folder | latents",
    "data_path": "image folder (one subfolder per class) or latents directory from minidit.extract_latents",
    "data_root": "where CIFAR-10 is downloaded",
    "image_size": "image side in pixels (latent models train on image_size / 8)",
    "num_classes": "number of classes (none: from the dataset)",
    "num_workers": "DataLoader worker processes for real datasets (0: load in the training process)",
    "model": "DiT-{Ti,S,B,L,XL}/{2,4,8}: size / patch size",
    "learn_sigma": "learn the variance too (hybrid loss mse + vb), as the paper",
    "class_dropout_prob": "label dropout in training: the null class for guidance (0: no guidance possible)",
    "attn_backend": "attention kernel: sdpa | math | flash_attn",
    "grad_checkpointing": "recompute each block in the backward pass (less memory, slower)",
    "compile": "torch.compile the model",
    "noise_schedule": "beta schedule: linear (the paper) | cosine (Improved DDPM)",
    "diffusion_steps": "diffusion steps T of the training schedule",
    "global_batch_size": "images per optimizer step, over all processes",
    "micro_batch_size": "images per process and forward pass (none: no gradient accumulation)",
    "lr": "AdamW learning rate",
    "warmup_steps": "linear learning-rate warm-up steps (0: none)",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this value (0: off)",
    "max_steps": "train until this optimizer step",
    "ema_decay": "EMA decay of the weights used for sampling",
    "precision": "auto (bf16/fp16 autocast on GPUs, fp32 on CPU) | fp32 | bf16 | fp16",
    "tf32": "TF32 matmuls on CUDA",
    "seed": "seed of the initial weights and of every step's noise",
    "device": "auto | cpu | cuda | mps",
    "run_dir": "run directory (none: runs/<config>)",
    "log_every": "write a log.jsonl row every N steps",
    "ckpt_every": "save checkpoints/last.pt every N steps",
    "ckpt_keep_every": "also keep checkpoints/step_N.pt every N steps (0: only last.pt)",
    "sample_every": "draw a sample grid every N steps (0: only at the end)",
    "samples_per_class": "columns of the sample grids",
    "sample_classes": "comma-separated class ids for the grid rows (empty: the first 16 classes)",
    "sample_steps": "sampling steps (respaced DDPM) for grids and evaluation",
    "cfg_scale": "classifier-free guidance scale for grids and evaluation",
    "eval_samples": "samples the toy classifier checks at the end (toy data only; 0: skip)",
    "vae": "latent models: VAE that decodes the grids (ema | mse | toy | a local directory)",
    "latent_sampling": "latents: fresh (a new posterior sample and flip per image and step, as the reference; "
    "needs extract_latents' default --posterior moments) | frozen (train on stored samples)",
    "hflip": "flip half of the training images left-right (off for digits, text, anything with a handedness)",
}  # fmt: skip


#: Named presets: each overrides some defaults. Fields not named keep TrainConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # A tiny DiT on the embedded toy shapes, pixel space, 2 CPU cores, <= 10 minutes.
    "toy": dict(
        data="toy", image_size=16, model="DiT-Ti/4", noise_schedule="cosine", global_batch_size=64, lr=2e-3,
        warmup_steps=200, max_steps=6000, ema_decay=0.995, log_every=20, ckpt_every=500, sample_every=2000,
        sample_steps=50, eval_samples=200,
    ),
    # Pixel-space CIFAR-10 on one GPU: DiT-S/2 on 32x32x3 = 256 tokens.
    "cifar10": dict(
        data="cifar10", image_size=32, model="DiT-S/2", global_batch_size=128, lr=2e-4, warmup_steps=1000,
        max_steps=200_000, ema_decay=0.9999, num_workers=4, log_every=100, ckpt_every=5000, ckpt_keep_every=50_000,
        sample_every=10_000, sample_steps=250, eval_samples=0,
    ),
    # The paper's ImageNet recipe (paper §5, the reference train.py) on pre-extracted latents.
    "imagenet256-xl2": dict(
        data="latents", data_path="data/latents/imagenet256", image_size=256, model="DiT-XL/2", num_classes=1000,
        global_batch_size=256, lr=1e-4, max_steps=400_000, ema_decay=0.9999, num_workers=8, log_every=100,
        ckpt_every=10_000, ckpt_keep_every=50_000, sample_every=50_000, sample_steps=250, cfg_scale=4.0,
        sample_classes="207,360,387,974,88,979,417,279", samples_per_class=4, eval_samples=0,
    ),
    "imagenet512-xl2": dict(
        data="latents", data_path="data/latents/imagenet512", image_size=512, model="DiT-XL/2", num_classes=1000,
        global_batch_size=256, lr=1e-4, max_steps=400_000, ema_decay=0.9999, num_workers=8, log_every=100,
        ckpt_every=10_000, ckpt_keep_every=50_000, sample_every=50_000, sample_steps=250, cfg_scale=4.0,
        sample_classes="207,360,387,974,88,979,417,279", samples_per_class=4, eval_samples=0,
    ),
}  # fmt: skip

#: Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = {
    "max_steps", "log_every", "ckpt_every", "ckpt_keep_every", "sample_every", "samples_per_class", "sample_classes",
    "sample_steps", "cfg_scale", "eval_samples", "num_workers", "device", "compile", "run_dir", "vae", "data_path",
    "data_root", "attn_backend", "grad_checkpointing", "micro_batch_size",
}  # fmt: skip

CHOICES = {
    "data": ("toy", "cifar10", "folder", "latents"),
    "attn_backend": ("sdpa", "math", "flash_attn"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "noise_schedule": ("linear", "cosine"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "latent_sampling": ("fresh", "frozen"),
}

#: Fields added after runs were saved: the value a config.json without the field had in effect.
ADDED_FIELDS = {
    "latent_sampling": lambda saved: "frozen" if saved.get("data") == "latents" else "fresh",
    "hflip": lambda saved: True,
}

VAE_FACTOR = 8  # the SD VAE downsamples by 8: 256 px -> 32x32x4 latents


#: Names people type from other trainers, mapped to ours (only used to suggest the right option).
ALIASES = {
    "learning_rate": "lr", "batch_size": "global_batch_size", "steps": "max_steps", "iterations": "max_steps",
    "epochs": "max_steps", "model_name": "model", "data_dir": "data_path", "dataset": "data",
    "results_dir": "run_dir", "output_dir": "run_dir", "out": "run_dir", "cfg": "cfg_scale",
}  # fmt: skip


def _suggest(word: str, options) -> str:
    close = closest(word, options)
    return f" (did you mean {close!r}?)" if close else ""


def _suggest_model(name: str) -> str:
    """`` (did you mean ...?)`` for an unknown model: a known size with a wrong patch size gets the closest
    patch sizes of that size (``DiT-XL/3`` -> ``'DiT-XL/2' or 'DiT-XL/4'``), anything else the closest name."""
    size, _, patch = name.rpartition("/")
    patches = sorted(int(m.rpartition("/")[2]) for m in MODELS if m.rpartition("/")[0] == size)
    if not patches or not patch.isdigit():
        return _suggest(name, MODELS)
    gap = min(abs(p - int(patch)) for p in patches)
    return f" (did you mean {' or '.join(repr(f'{size}/{p}') for p in patches if abs(p - int(patch)) == gap)}?)"


def _parse_value(name: str, raw: str, annotation: str) -> Any:
    kind = annotation.replace(" ", "")
    optional = "None" in kind
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            try:
                return int(raw)
            except ValueError:
                value = float(raw)  # "4e5"
                if not value.is_integer():
                    raise
                return int(value)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')}: expected {kind.split('|')[0]}, got {raw!r}") from None
    return raw


def parse_overrides(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """``["--config", "toy", "--lr", "3e-4", "--compile"]`` -> ("toy", {"lr": 3e-4, "compile": True})."""
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    preset, overrides, i = "toy", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key value")
        key, _, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        has_value = bool(_) or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if not _ and has_value:
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            if not has_value:
                raise UserError("--config needs a name: " + ", ".join(PRESETS))
            if value not in PRESETS:
                raise UserError(
                    f"unknown config {value!r}{_suggest(value, PRESETS)}; choose one of {', '.join(PRESETS)}"
                )
            preset = value
            continue
        if name not in types:
            guess = ALIASES.get(name) or closest(name, types)
            hint = f" (did you mean --{guess.replace('_', '-')}?)" if guess else ""
            raise UserError(f"unknown option --{key}{hint}; see --help for the list")
        if not has_value:
            if types[name].startswith("bool"):
                value = "true"
            else:
                raise UserError(f"--{key} needs a value")
        overrides[name] = _parse_value(name, value, types[name])
    return preset, overrides


#: ``--data folder`` under the default config: the toy preset is tuned to the toy generator (16 tokens,
#: cosine, lr 2e-3), so a folder of real images gets these instead: the reference's linear schedule and
#: 64 tokens, no flips (digits, text), EMA for a short run. Measured on two kinds of real 16 px images with
#: benchmarks/folder_defaults.py (benchmarks/results/folder-defaults-2026-11-30.md). The model is
#: a DiT-Ti whose patch size gives about ``FOLDER_TOKENS`` tokens (``folder_patch``). Options given win.
FOLDER_DEFAULTS: dict[str, Any] = dict(
    noise_schedule="linear", lr=1e-3, warmup_steps=200, ema_decay=0.995, max_steps=3000, hflip=False, eval_samples=0,
)  # fmt: skip
FOLDER_TOKENS = 64


def folder_patch(image_size: int) -> int:
    """The DiT-Ti patch size (2, 4 or 8) that divides ``image_size`` and gives the token count
    ``(image_size / patch)^2`` closest to ``FOLDER_TOKENS``: 16 px -> 2, 32 px -> 4, 64 px -> 8."""
    fits = [p for p in (2, 4, 8) if image_size % p == 0] or [2]  # none fits: validate() says why
    return min(fits, key=lambda p: abs(math.log(max(image_size // p, 1) ** 2 / FOLDER_TOKENS)))


def folder_defaults(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The folder defaults that apply: for ``--data folder`` under the default (toy) config, the
    ``FOLDER_DEFAULTS`` and the model of ``folder_patch``, less the fields given in ``overrides``; else {}."""
    if preset != "toy" or overrides.get("data") != "folder":
        return {}
    size = overrides.get("image_size", PRESETS["toy"]["image_size"])
    chosen = {"image_size": size, "model": f"DiT-Ti/{folder_patch(size)}", **FOLDER_DEFAULTS}
    return {k: v for k, v in chosen.items() if k not in overrides}


def describe_folder_defaults(applied: dict[str, Any], cfg: TrainConfig) -> str:
    """One line for the start of a run: the folder defaults in effect."""
    items = []
    for key, value in applied.items():
        text = f"--{key.replace('_', '-')} {value if isinstance(value, str) else json.dumps(value)}"
        if key == "model":
            tokens = (cfg.image_size // int(str(value).rpartition("/")[2])) ** 2
            text += f" ({tokens} tokens at {cfg.image_size} px)"
        items.append(text)
    return "folder defaults (real images; pass --key value to change one): " + ", ".join(items)


def build_config(preset: str = "toy", overrides: dict[str, Any] | None = None) -> TrainConfig:
    overrides = overrides or {}
    cfg = TrainConfig(**{**PRESETS[preset], **folder_defaults(preset, overrides), **overrides})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Fail before any work, in one line, on values that cannot work."""
    for name, options in CHOICES.items():
        value = getattr(cfg, name)
        if value not in options:
            flag, hint = name.replace("_", "-"), _suggest(str(value), options)
            raise UserError(f"--{flag} {value!r}{hint}: choose one of {', '.join(options)}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if cfg.model not in MODELS:
        raise UserError(f"unknown model {cfg.model!r}{_suggest_model(cfg.model)}; choose one of {', '.join(MODELS)}")
    patch = int(cfg.model.split("/")[1])
    factor = VAE_FACTOR if cfg.data == "latents" else 1
    if cfg.image_size <= 0 or cfg.image_size % (patch * factor):
        if factor > 1:
            what = f"patch size {patch} x VAE factor {factor} = {patch * factor}"
        else:
            what = f"the patch size {patch} of {cfg.model}"
        raise UserError(f"--image-size {cfg.image_size} is not divisible by {what}")
    if cfg.data == "toy" and cfg.image_size not in (16, 32, 64):
        raise UserError(f"the toy data is rendered at 16, 32 or 64 px, not {cfg.image_size}")
    if cfg.data == "cifar10" and cfg.image_size != 32:
        raise UserError(f"CIFAR-10 images are 32x32; --image-size {cfg.image_size} needs --data folder")
    if cfg.data in ("folder", "latents") and not cfg.data_path:
        raise UserError(f"--data {cfg.data} needs --data-path")
    positive = (
        "global_batch_size",
        "max_steps",
        "log_every",
        "ckpt_every",
        "diffusion_steps",
        "samples_per_class",
        "sample_steps",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size <= 0:
        raise UserError(f"--micro-batch-size must be positive, got {cfg.micro_batch_size}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0 <= cfg.class_dropout_prob < 1:
        raise UserError(f"--class-dropout-prob must be in [0, 1), got {cfg.class_dropout_prob}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.sample_steps > cfg.diffusion_steps:
        raise UserError(f"--sample-steps {cfg.sample_steps} exceeds --diffusion-steps {cfg.diffusion_steps}")
    if cfg.eval_samples and cfg.data != "toy":
        raise UserError(
            "--eval-samples (sample accuracy) needs the toy data's classifier; use minidit.evaluate for FID"
        )
    known = cfg.num_classes or (TOY_CLASSES if cfg.data == "toy" else None)
    sample_classes(cfg, known)


#: The toy data's number of classes (``minidit.toy.NUM_CLASSES``; a test checks they agree).
TOY_CLASSES = 10


def sample_classes(cfg: TrainConfig, num_classes: int | None) -> list[int]:
    """The class ids of the sample grids' rows (``--sample-classes``, or the first 16 classes), checked
    against ``num_classes`` (None: not known yet, only the syntax is checked)."""
    if not cfg.sample_classes:
        return list(range(min(num_classes or 16, 16)))
    try:
        classes = [int(c) for c in cfg.sample_classes.split(",")]
    except ValueError:
        raise UserError(f"--sample-classes takes comma-separated class ids, got {cfg.sample_classes!r}") from None
    bad = [c for c in classes if not 0 <= c < (num_classes or math.inf)]
    if bad:
        limit = f"0..{num_classes - 1} (the data has {num_classes} classes)" if num_classes else "0 and up"
        raise UserError(f"--sample-classes {','.join(map(str, bad))}: class ids must be in {limit}")
    return classes


def _check_type(name: str, value: Any, annotation: str) -> bool:
    kinds = annotation.replace(" ", "").split("|")
    return (
        (value is None and "None" in kinds)
        or (isinstance(value, bool) and "bool" in kinds)
        or (isinstance(value, int) and not isinstance(value, bool) and ("int" in kinds or "float" in kinds))
        or (isinstance(value, float) and "float" in kinds)
        or (isinstance(value, str) and "str" in kinds)
    )


def config_from_dict(saved: Any, source: str) -> TrainConfig:
    """The ``TrainConfig`` a run saved (``to_dict`` output in config.json or a checkpoint), type-checked and
    validated; a damaged or foreign one is a ``UserError`` naming ``source``."""
    if not isinstance(saved, dict):
        raise UserError(f"{source}: holds no training config; pass --run-dir NEW_DIR for a new run")
    saved = {**{k: old(saved) for k, old in ADDED_FIELDS.items() if k not in saved}, **saved}
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    wrong = [k for k, v in saved.items() if k not in types or not _check_type(k, v, types[k])]
    try:
        if wrong:
            raise UserError(", ".join(f"{k}={saved[k]!r}" for k in wrong[:3]) + " not valid")
        cfg = TrainConfig(**saved)
        validate(cfg)
    except UserError as e:
        raise UserError(f"{source}: its saved config is invalid ({e}); pass --run-dir NEW_DIR for a new run") from None
    return cfg


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per process, gradient-accumulation steps) such that
    micro x accumulation x world_size = global_batch_size."""
    micro = cfg.micro_batch_size or cfg.global_batch_size // world_size
    if micro <= 0 or cfg.global_batch_size % (micro * world_size):
        raise UserError(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by "
            f"micro batch {micro} x {world_size} processes"
        )
    return micro, cfg.global_batch_size // (micro * world_size)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Fields whose change would make a resumed run a different run."""
    now = to_dict(cfg)
    saved = {**{k: old(saved) for k, old in ADDED_FIELDS.items() if k not in saved}, **saved}
    keys = sorted((set(saved) | set(now)) - RESUMABLE_CHANGES)
    return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in keys if saved.get(k) != now.get(k)]


def help_text() -> str:
    lines = [
        "usage: python -m minidit.train [--config NAME] [--key value ...]",
        "",
        "configs: " + ", ".join(PRESETS),
        "",
    ]
    lines.append("fields (defaults of --config toy):")
    toy = build_config("toy")
    for f in fields(TrainConfig):
        flag, default = f"--{f.name.replace('_', '-')}", json.dumps(getattr(toy, f.name))
        lines.append(f"  {flag:<22} {default:<11} {HELP.get(f.name, '')}".rstrip())
    return "\n".join(lines)
