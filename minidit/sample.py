"""Sample from a DiT: ``python -m minidit.sample`` (lesson 07).

    python -m minidit.sample --ckpt runs/toy --classes "red circle,blue square" --out grid.png
    python -m minidit.sample --ckpt DiT-XL-2-256x256.pt --classes "golden retriever,207" --cfg-scale 4
    torchrun --nproc_per_node 8 -m minidit.sample --ckpt DiT-XL-2-256x256.pt --num-samples 50000 \\
        --cfg-scale 1.5 --npz samples.npz        # the .npz that the ADM evaluator reads

Checkpoints: a minidit run directory or training checkpoint (EMA weights), the released
DiT-XL/2 weights by name, or any file/directory ``minidit.checkpoint`` reads. Latent
models (4 input channels) are decoded with the Stable Diffusion VAE (``--vae``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .checkpoint import extract_state_dict, model_from_checkpoint, model_from_state_dict, read_file
from .diffusion import create_diffusion
from .errors import UserError, run_cli
from .model import DiT

#: The reference sampler's example classes (ImageNet ids).
DEFAULT_IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    num_steps: int = 250,
    sampler: str = "ddpm",
    seed: int = 0,
    guided_channels: int | None = 3,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_denoised: bool = False,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Class-conditional samples: labels [N] -> images [N, C, H, W] (decoded to [-1, 1] when ``decoder``).

    DDPM (ancestral, learned variance) or DDIM (eta = 0) over ``num_steps`` respaced
    steps; classifier-free guidance with ``cfg_scale`` (1: none) on ``guided_channels``
    (3, the reference; None: all). Noise for chunk k comes from a generator seeded with
    ``seed + k``, so the same seed gives the same images.
    """
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"--sampler {sampler!r}: choose ddpm or ddim")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    diffusion = create_diffusion(str(num_steps), noise_schedule, model.learn_sigma, diffusion_steps)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    was_training = model.training
    model.eval()
    out = []
    for k, y in enumerate(labels.split(batch_size)):
        g = torch.Generator(device).manual_seed(seed + k)
        y = y.to(device)
        z = torch.randn(len(y), model.in_channels, model.input_size, model.input_size, generator=g, device=device)
        if cfg_scale == 1.0:
            x = loop(
                model, z.shape, z, model_kwargs=dict(y=y), generator=g, progress=progress, clip_denoised=clip_denoised
            )
        else:
            null = torch.full_like(y, model.num_classes)
            fn = partial(model.forward_with_cfg, guided_channels=guided_channels)
            z2 = torch.cat([z, z])
            kw = dict(y=torch.cat([y, null]), cfg_scale=cfg_scale)
            x = loop(fn, z2.shape, z2, model_kwargs=kw, generator=g, progress=progress, clip_denoised=clip_denoised)
            x = x[: len(y)]
        out.append(decoder(x).clamp(-1, 1) if decoder is not None else x)
    model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------
# Loading what to sample from
# --------------------------------------------------------------------------


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's bundled metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_for_sampling(ckpt: str, image_size: int | None = None) -> tuple[DiT, dict]:
    """A model in eval mode, plus what is known about its data: class names, latent or pixels."""
    path = Path(ckpt)
    if path.is_dir() and (path / "checkpoints" / "last.pt").is_file():
        path = path / "checkpoints" / "last.pt"  # a minidit run directory
    info: dict = {}
    if path.is_file() and path.suffix == ".pt":
        raw = read_file(path)
        if isinstance(raw.get("config"), dict):  # a minidit training checkpoint: EMA weights + metadata
            info["train_config"] = raw["config"]
            info["class_names"] = raw.get("class_names")
        model = model_from_state_dict(extract_state_dict(raw), str(path))
    else:
        model = model_from_checkpoint(ckpt, **({"input_size": image_size // 8} if image_size else {}))
    info["latent"] = model.in_channels == 4
    if info.get("class_names") is None:
        data = info.get("train_config", {}).get("data")
        if data == "toy":
            from . import toy

            info["class_names"] = list(toy.CLASS_NAMES)
        elif data == "cifar10":
            info["class_names"] = CIFAR10_CLASSES
        elif model.num_classes == 1000:
            info["class_names"] = imagenet_class_names()
        else:
            info["class_names"] = [str(i) for i in range(model.num_classes)]
    return model, info


def parse_classes(spec: str, names: list[str]) -> list[int]:
    """ "207,golden retriever, red circle" -> class ids; names match case-insensitively."""
    lower = [n.lower() for n in names]
    ids = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.isdigit():
            if int(item) >= len(names):
                raise UserError(f"class id {item} is out of range 0..{len(names) - 1}")
            ids.append(int(item))
        elif item.lower() in lower:
            ids.append(lower.index(item.lower()))
        else:
            close = difflib.get_close_matches(item.lower(), lower, n=1, cutoff=0.6)
            hint = f" (did you mean {names[lower.index(close[0])]!r}?)" if close else ""
            raise UserError(f"unknown class {item!r}{hint}")
    if not ids:
        raise UserError("--classes is empty")
    return ids


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidit.sample", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt", required=True, help="run directory, checkpoint file, diffusers dir, or DiT-XL-2-256x256.pt"
    )
    p.add_argument("--classes", default="", help="comma-separated class ids or names (default: a few per dataset)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class in the grid")
    p.add_argument("--num-samples", type=int, default=0, help="N random-class samples instead of a grid (for FID)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale; 1 = none (FID: 1.5)")
    p.add_argument("--guided-channels", default="3", help="3 (the reference) or 'all'")
    p.add_argument("--num-steps", type=int, default=250, help="sampling steps (respaced from 1000)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=None, choices=(256, 512), help="for diffusers dirs without config")
    p.add_argument("--vae", default="ema", help="ema | mse | a local AutoencoderKL directory (latent models)")
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--out-dir", default=None, help="also write one PNG per sample here")
    p.add_argument("--npz", default=None, help="write uint8 samples (and labels) to this .npz (ADM evaluator format)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.guided_channels not in ("all", "1", "2", "3", "4"):
        raise UserError(f"--guided-channels {args.guided_channels!r}: use 1-4 or 'all'")
    guided = None if args.guided_channels == "all" else int(args.guided_channels)
    if args.num_steps <= 0 or args.num_steps > 1000 or args.batch_size <= 0 or args.per_class <= 0:
        raise UserError("--num-steps must be in 1..1000, --batch-size and --per-class positive")

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.set_device(device)

    model, info = load_for_sampling(args.ckpt, args.image_size)
    model.to(device)
    names = info["class_names"]
    decoder, clip = None, True
    if info["latent"]:
        from . import vae

        v = vae.load_vae(args.vae, device=device)
        decoder, clip = partial(vae.decode, v), False

    if args.num_samples:
        # FID protocol: uniformly random classes; process r samples every world-th image
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, model.num_classes, (args.num_samples,), generator=g)
        mine = torch.arange(rank, args.num_samples, world)
    else:
        if args.classes:
            classes = parse_classes(args.classes, names)
        else:
            classes = DEFAULT_IMAGENET_CLASSES if model.num_classes == 1000 else list(range(min(model.num_classes, 10)))
        labels = torch.tensor(classes).repeat_interleave(args.per_class)
        mine = torch.arange(len(labels)) if rank == 0 else torch.arange(0)
    trained = info.get("train_config", {})  # a minidit run knows its schedule; released weights use the default
    images = generate(
        model, labels[mine], cfg_scale=args.cfg_scale, num_steps=args.num_steps, sampler=args.sampler,
        seed=args.seed * 1000 + rank, guided_channels=guided, decoder=decoder, clip_denoised=clip,
        noise_schedule=trained.get("noise_schedule", "linear"), diffusion_steps=trained.get("diffusion_steps", 1000),
        batch_size=args.batch_size, device=device, progress=rank == 0,
    )  # fmt: skip
    from .plots import save_class_grid, to_uint8

    pixels = to_uint8(images).numpy()
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, (mine.numpy(), pixels))
        if rank == 0:
            order = np.concatenate([p[0] for p in parts])
            pixels = np.concatenate([p[1] for p in parts])[np.argsort(order)]
        dist.barrier()
    if rank != 0:
        return 0
    written = []
    if args.npz:
        from .checkpoint import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=pixels, labels=labels.numpy())

        atomic_write(args.npz, write)
        written.append(f"{args.npz} ({pixels.shape[0]} images {pixels.shape[1]}x{pixels.shape[2]}, uint8)")
    if not args.num_samples:
        rows = [names[c] for c in classes]
        save_class_grid(
            images.cpu(),
            rows,
            args.per_class,
            args.out,
            title=f"CFG {args.cfg_scale:g}, {args.sampler} {args.num_steps}",
        )
        written.append(args.out)
    if args.out_dir:
        from PIL import Image

        os.makedirs(args.out_dir, exist_ok=True)
        for i, img in enumerate(pixels):
            Image.fromarray(img).save(os.path.join(args.out_dir, f"{i:06d}_{int(labels[i])}.png"))
        written.append(f"{args.out_dir}/ ({len(pixels)} PNGs)")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
