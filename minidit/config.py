"""Training configurations: one dataclass of defaults, four named presets, ``--key value`` overrides.

    python -m minidit.train                                   # --config toy: 2 CPU cores, minutes
    python -m minidit.train --config cifar10                  # one GPU, pixel space
    torchrun --nproc_per_node 8 -m minidit.train --config imagenet256-xl2 --data-path data/latents/imagenet256

Every field of ``TrainConfig`` can be overridden on the command line as
``--field value`` (or ``--field=value``; dashes and underscores are the same): ``build_parser`` makes an
argparse option of each field, typed from its annotation, with its help line.
Unknown fields, bad values and impossible combinations fail before any work,
in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ArgumentParser, UserError, closest
from .model import MODELS


def _field(default: Any, text: str) -> Any:
    """A ``TrainConfig`` field and its line in ``--help``."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    # -- data ----------------------------------------------------------------------------
    data: str = _field("toy", "what to train on: toy (shapes drawn on the fly) | cifar10 | folder | latents")
    data_path: str | None = _field(None, "image folder (one subfolder per class) or minidit.extract_latents output")
    data_root: str = _field("data", "where CIFAR-10 is downloaded")
    image_size: int = _field(32, "image side in pixels (latent models train on image_size / 8)")
    num_classes: int | None = _field(None, "number of classes (none: from the dataset)")
    num_workers: int = _field(0, "DataLoader worker processes for real datasets (0: load in the training process)")
    latent_sampling: str = _field(
        "fresh",
        "latents: fresh (a new posterior sample and flip per image and step, as the reference; needs "
        "extract_latents' default --posterior moments) | frozen (train on stored samples)",
    )
    hflip: bool = _field(True, "flip half of the images left-right, as the reference (off for digits, text...)")
    # -- model -----------------------------------------------------------------------------
    model: str = _field("DiT-Ti/4", "DiT-{Ti,S,B,L,XL}/{2,4,8}: size / patch size")
    learn_sigma: bool = _field(True, "learn the variance too (hybrid loss mse + vb), as the paper")
    class_dropout_prob: float = _field(0.1, "label dropout: the null class for guidance (0: no guidance possible)")
    attn_backend: str = _field("sdpa", "attention kernel")
    grad_checkpointing: bool = _field(False, "recompute each block in the backward pass (less memory, slower)")
    compile: bool = _field(False, "torch.compile the model")
    # -- diffusion -------------------------------------------------------------------------
    objective: str = _field(
        "ddpm",
        "ddpm (Gaussian diffusion: eps + learned variance, the paper) | flow (flow matching: the velocity on the "
        "linear interpolant, as SD3 and SiT; learn_sigma's extra channels are then unused)",
    )
    t_sampling: str = _field("uniform", "flow: training times t, uniform | logit-normal (SD3 §3.1, m=0, s=1)")
    noise_schedule: str = _field("linear", "beta schedule: linear (the paper) | cosine (Improved DDPM)")
    diffusion_steps: int = _field(1000, "diffusion steps T of the training schedule")
    # -- optimisation (the reference: AdamW, constant lr 1e-4, no weight decay, EMA 0.9999) -
    global_batch_size: int = _field(64, "images per optimizer step, over all processes")
    micro_batch_size: int | None = _field(None, "images per process and forward pass (none: no accumulation)")
    lr: float = _field(1e-4, "AdamW learning rate")
    warmup_steps: int = _field(0, "linear learning-rate warm-up steps (0: none)")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    grad_clip: float = _field(0.0, "clip the gradient norm to this value (0: off, like the reference)")
    max_steps: int = _field(1000, "train until this optimizer step")
    ema_decay: float = _field(0.9999, "EMA decay of the weights used for sampling")
    precision: str = _field("auto", "autocast (auto: bf16 on GPUs that have it, else fp16 + GradScaler; CPU: fp32)")
    tf32: bool = _field(True, "TF32 matmuls on CUDA")
    # -- bookkeeping -----------------------------------------------------------------------
    seed: int = _field(0, "seed of the initial weights and of every step's noise")
    device: str = _field("auto", "where to train (auto: CUDA, else MPS, else CPU)")
    run_dir: str | None = _field(None, "run directory (none: runs/<config>)")
    log_every: int = _field(10, "write a log.jsonl row every N steps")
    ckpt_every: int = _field(250, "save checkpoints/last.pt every N steps")
    ckpt_keep_every: int = _field(0, "also keep checkpoints/step_N.pt every N steps (0: only last.pt)")
    sample_every: int = _field(500, "draw a sample grid every N steps (0: only at the end)")
    samples_per_class: int = _field(6, "columns of the sample grids")
    sample_classes: str = _field("", "comma-separated class ids for the grid rows (empty: the first 16 classes)")
    sample_steps: int = _field(100, "sampling steps (respaced DDPM; flow: Euler) for grids and evaluation")
    cfg_scale: float = _field(4.0, "classifier-free guidance scale for grids and evaluation")
    eval_samples: int = _field(200, "samples the toy classifier checks at the end (toy data only; 0: skip)")
    vae: str = _field("ema", "latent models: VAE that decodes the grids (ema | mse | toy | a local directory)")


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
    "objective": ("ddpm", "flow"),
    "t_sampling": ("uniform", "logit-normal"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "latent_sampling": ("fresh", "frozen"),
}

#: Fields added after runs were saved: the value a config.json without the field had in effect.
ADDED_FIELDS = {
    "latent_sampling": lambda saved: "frozen" if saved.get("data") == "latents" else "fresh",
    "hflip": lambda saved: True,
    "objective": lambda saved: "ddpm",
    "t_sampling": lambda saved: "uniform",
}

VAE_FACTOR = 8  # the SD VAE downsamples by 8: 256 px -> 32x32x4 latents


#: Options people type from other trainers, mapped to ours (only used to suggest the right option).
ALIASES = {
    "learning-rate": "lr", "batch-size": "global-batch-size", "steps": "max-steps", "iterations": "max-steps",
    "epochs": "max-steps", "model-name": "model", "data-dir": "data-path", "dataset": "data",
    "results-dir": "run-dir", "output-dir": "run-dir", "out": "run-dir", "cfg": "cfg-scale",
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


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _int(text: str) -> int:
    """An int, also written as a float without a fraction (``4e5``)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def _value_type(annotation: str):
    """The ``argparse`` type of a field annotated ``annotation``: ``"int | None"`` reads ``4e5`` or none."""
    kind, *others = annotation.replace(" ", "").split("|")

    def parse(text: str) -> Any:
        if "None" in others and text.lower() in ("none", "null", ""):
            return None
        try:
            return {"bool": lambda t: BOOLS[t.lower()], "int": _int, "float": float, "str": str}[kind](text)
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None

    return parse


def _preset(name: str) -> str:
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown config {name!r}{_suggest(name, PRESETS)}; choose one of {', '.join(PRESETS)}"
        )
    return name


def _shown(value: Any) -> str:
    """A value as it is typed on the command line: ``DiT-Ti/4``, ``0.002``, ``false``, ``none``."""
    return "none" if value is None else value if isinstance(value, str) and value else json.dumps(value)


def build_parser() -> ArgumentParser:
    """``--config NAME`` and one option per ``TrainConfig`` field (``--field-name``, typed from its annotation,
    a bool alone means true). Options not given stay out of the result (``SUPPRESS``): the fields the user set
    are told apart from defaults, even when equal to them (folder defaults and presets give way to them)."""
    toy = {**dataclasses.asdict(TrainConfig()), **PRESETS["toy"]}
    parser = ArgumentParser(
        prog="python -m minidit.train",
        usage="%(prog)s [--config NAME] [--key value ...]",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=42, width=1000),  # one line each
    )
    parser.add_argument(
        "--config",
        type=_preset,
        metavar="NAME",
        help=f"preset: {' | '.join(PRESETS)} (default: toy, whose defaults are shown)",
    )
    for f in fields(TrainConfig):
        kind = str(f.type).split("|")[0].strip()
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_value_type(str(f.type)),
            # CHOICES are shown here, checked by validate() (with a "did you mean"), as saved configs are
            metavar="{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else kind.upper(),
            help=f"{f.metadata['help']} (default: {_shown(toy[f.name])})",
            **(dict(nargs="?", const=True) if kind == "bool" else {}),
        )
    return parser


def parse_overrides(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """``["--config", "cifar10", "--lr=3e-4", "--compile"]`` -> ("cifar10", {"lr": 3e-4, "compile": True}):
    the preset and the fields given on the command line."""
    parser, args = build_parser(), []
    for arg in argv:
        if arg.startswith("--"):  # --max_steps is --max-steps
            key, eq, value = arg.partition("=")
            key = key.replace("_", "-")
            if key[2:] in ALIASES:  # another trainer's name: point to ours
                parser.error(f"unknown option {key} (did you mean --{ALIASES[key[2:]]}?)")
            arg = key + eq + value
        elif arg.startswith("-") and arg != "-h" and args and args[-1].startswith("--") and "=" not in args[-1]:
            args[-1] += "=" + arg  # a value argparse would take for an option (--cfg-scale -inf): attach it
            continue
        args.append(arg)
    given = vars(parser.parse_args(args))
    return given.pop("config", "toy"), given


#: ``--data folder`` under the default config: the toy preset's 16 tokens at 16 px and its flips do not
#: serve real images, so a folder gets 64 tokens, no flips (a mirrored digit or letter is not its class),
#: the cosine schedule (Improved DDPM's, for small images) at lr 2e-3, and an EMA for a short run. Chosen
#: from 3,000-step runs on two kinds of real 16 px images with benchmarks/folder_defaults.py
#: (benchmarks/results/folder-defaults-2026-12-01.md): against the reference's linear schedule at lr 1e-3,
#: digits 99.3% vs 77.3% of CFG-4 samples recognised. The model is a DiT-Ti whose patch size gives about
#: ``FOLDER_TOKENS`` tokens (``folder_patch``). Options given win.
FOLDER_DEFAULTS: dict[str, Any] = dict(
    noise_schedule="cosine", lr=2e-3, warmup_steps=200, ema_decay=0.995, max_steps=3000, hflip=False, eval_samples=0,
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
        text = f"--{key.replace('_', '-')} {_shown(value)}"
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
    positive = ("global_batch_size", "max_steps", "log_every", "ckpt_every", "diffusion_steps", "samples_per_class",
                "sample_steps")  # fmt: skip
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
    return build_parser().format_help().rstrip()
