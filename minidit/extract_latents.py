"""Encode an image folder with the VAE once, so training reads latents instead of running the encoder.

    python -m minidit.extract_latents --data-path DIR --out data/latents/NAME --image-size 256 \\
        [--posterior moments|sample|mean] [--flip] [--vae ema|mse|toy|PATH] [--batch-size 32] \\
        [--shard-size 4096] [--dtype float16|float32] [--device auto] [--num-workers 4] [--seed 0]

Images go through the same ADM centre crop as pixel training (:class:`minidit.data.ImageFolderDataset`).
What is stored per image (``--posterior``):

- ``moments`` (default): the VAE posterior's mean and std of the image *and* of its mirror image.
  The trainer draws a fresh posterior sample ``z = (mean + std * eps) * 0.18215`` and a random flip
  for every image at every step, as the reference does (it encodes every image at every step).
  4 tensors ``[4, h, w]`` per image: 32 KiB at 256 px in float16 (ImageNet: ~42 GB).
- ``sample`` (frozen, what fast-DiT does): one posterior sample, drawn once here, and with ``--flip``
  one of the mirror image; training sees the same sample every epoch, and no flips without ``--flip``.
  8 KiB per image at 256 px in float16, 16 KiB with ``--flip`` (ImageNet: ~10.5 GB, ~21 GB).
- ``mean`` (frozen; ``--mean`` is short for it): the posterior mean instead of a sample.

The output directory holds

- ``shard_00000.safetensors``, ...: shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``
  of the sorted file list, as ``labels [n]`` int64 and the latents: ``moments [n, 2, 2, 4, h, w]``
  (image / mirror image, mean / std, unscaled), or frozen ``latents [n, 4, h, w]`` (scaled by 0.18215)
  and, with ``--flip``, ``latents_flip [n, 4, h, w]`` (see :func:`minidit.data.shard_layout`);
- ``meta.json``: the settings (VAE, scale, image size, latent shape, number of images, class
  names, a digest of the file list, shard size, flip, posterior, seed, dtype, format version)
  and ``complete``. It is written before the first shard with ``complete: false`` and
  updated to ``true`` after the last, so an interrupted extraction is recognisable.

Latents are stored as float16 by default: half the disk and read bandwidth of float32, with a
relative rounding error <= 2^-11 (about 5e-4) of each stored value. ``--dtype float32`` keeps full
precision, at twice the size.

Resumable: shards are written atomically (temporary file, fsync, rename), so a shard
file that exists is complete; a rerun with the same settings checks each one and
encodes only the missing or invalid shards. A rerun with different settings into the
same directory is refused, naming the fields that differ.

Deterministic: a frozen posterior sample of every image uses noise drawn, image after image,
from a CPU generator seeded by (``--seed``, shard index), so a shard comes out the same
whatever the batch size, worker count or device order (up to the VAE's own numerics on
different devices). Moments need no noise (``--seed`` does not matter for them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .data import LATENTS_FORMAT, LATENTS_VERSION, POSTERIORS, ImageFolderDataset, shard_layout, shard_name
from .errors import ArgumentParser, UserError, run_cli
from .fileio import atomic_write, read_json, write_json
from .runtime import resolve_device, shard_generator
from .vae import SCALE, downsample_factor, load_vae, posterior_moments, resolve_vae, sample_posterior

DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}

#: Fields of meta.json that must agree for a rerun to continue an extraction.
SETTINGS = (
    "format", "version", "vae", "scale", "image_size", "num_images", "class_names", "files_sha256",
    "shard_size", "flip", "posterior", "seed", "dtype",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m minidit.extract_latents",
        description="Encode an image folder (one subfolder per class) into sharded SD-VAE latents for training.",
    )
    p.add_argument("--data-path", required=True, help="image folder: DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="output directory, e.g. data/latents/NAME")
    p.add_argument("--image-size", type=int, default=256, help="pixels; the latent side is image-size / 8")
    p.add_argument("--vae", default="ema", help="ema | mse | toy | a Hugging Face id | an AutoencoderKL directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument(
        "--posterior",
        choices=POSTERIORS,
        default=None,
        help="moments (default: mean and std of each image and its mirror image, sampled afresh at every "
        "training step, 32 KiB/image at 256 px in float16) | sample (frozen: one posterior sample, 8 KiB/image) "
        "| mean (frozen: the posterior mean)",
    )
    p.add_argument(
        "--flip",
        action="store_true",
        help="frozen latents: also store the latent of each mirrored image (moments always include it)",
    )
    p.add_argument("--mean", action="store_true", help="same as --posterior mean")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype of the latents")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images")
    p.add_argument("--seed", type=int, default=0, help="seeds the posterior samples (with the shard index)")
    args = p.parse_args(argv)
    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.image_size % 8:
        raise UserError(f"--image-size must be a multiple of 8 (the VAE shrinks each side 8x), got {args.image_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.mean and args.posterior not in (None, "mean"):
        raise UserError(f"--mean contradicts --posterior {args.posterior}; pass one of them")
    args.posterior = "mean" if args.mean else args.posterior or "moments"
    return args


def settings_digest(settings: dict[str, Any]) -> str:
    """A short fingerprint of the settings, stored in every shard so foreign shards are never reused."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items]"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "..."


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = out / "meta.json"
    if not path.is_file():
        if any(out.glob("shard_*.safetensors")):
            raise UserError(f"{out}: holds shard files but no meta.json; use another --out, or delete it to start over")
        return None
    meta = read_json(path, hint=f"delete {out} to start over")
    if meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{path}: not a minidit latents meta.json; use another --out")
    return meta


def _check_same(out: Path, old: dict[str, Any], new: dict[str, Any], keys) -> None:
    differ = [k for k in keys if k in new and old.get(k) != new[k]]
    if differ:
        details = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new[k])} now" for k in differ)
        raise UserError(
            f"{out}: holds an extraction with different settings ({details}); "
            "use another --out, or delete it to start over"
        )


def _shard_range(shard: int, shard_size: int, num_images: int) -> tuple[int, int]:
    return shard * shard_size, min((shard + 1) * shard_size, num_images)


def shard_is_complete(path: Path, start: int, stop: int, settings: dict[str, Any]) -> bool:
    """Whether ``path`` is a finished shard of exactly these settings and index range (header only)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    layout = shard_layout(settings)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            header = (meta.get("settings"), meta.get("start"), meta.get("stop"))
            if header != (settings_digest(settings), str(start), str(stop)) or set(f.keys()) != {*layout, "labels"}:
                return False
            if tuple(f.get_slice("labels").get_shape()) != (stop - start,):
                return False
            for key, shape in layout.items():
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != (stop - start, *shape):
                    return False
                if sl.get_dtype() != _SAFETENSORS_DTYPES[settings["dtype"]]:
                    return False
            return True
    except Exception:  # unreadable or foreign file: recompute it
        return False


class _Indexed(Dataset):
    """``(x, y, index, source)``: ``source`` differs from ``index`` when an unreadable file was replaced."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y, source = self.dataset.load(index)
        return x, y, index, source


def _write_shard(path: Path, parts: dict[str, list], start: int, stop: int, settings: dict[str, Any]) -> list[int]:
    from safetensors.torch import save_file

    dtype = DTYPES[settings["dtype"]]
    tensors = {key: torch.cat(parts[key]).to(dtype).contiguous() for key in shard_layout(settings)}
    tensors["labels"] = torch.cat(parts["labels"]).long().contiguous()
    assert len(tensors["labels"]) == stop - start, "a shard must be filled exactly"
    substituted = [int(i) for i, s in zip(torch.cat(parts["index"]), torch.cat(parts["source"])) if i != s]
    metadata = {
        "format": LATENTS_FORMAT,
        "settings": settings_digest(settings),
        "start": str(start),
        "stop": str(stop),
        "substituted": json.dumps(substituted),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return substituted


def _substituted(out: Path, num_shards: int, dataset: ImageFolderDataset) -> list[str]:
    """The unreadable files (relative paths) that shards replaced by a readable neighbour."""
    from safetensors import safe_open

    found: list[int] = []
    for s in range(num_shards):
        with safe_open(str(out / shard_name(s)), framework="pt") as f:
            found.extend(json.loads((f.metadata() or {}).get("substituted", "[]")))
    return [os.path.relpath(dataset.samples[i][0], dataset.root) for i in found]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = ImageFolderDataset(args.data_path, args.image_size)
    source, subfolder = resolve_vae(args.vae)
    n = len(dataset)
    moments = args.posterior == "moments"
    settings: dict[str, Any] = {
        "format": LATENTS_FORMAT,
        "version": LATENTS_VERSION if moments else 1,  # frozen latents keep version 1, as before moments
        "vae": source + (f"/{subfolder}" if subfolder else ""),
        "scale": SCALE,
        "image_size": args.image_size,
        "num_images": n,
        "class_names": dataset.class_names,
        "files_sha256": dataset.files_digest(),
        "shard_size": args.shard_size,
        "flip": args.flip or moments,
        "posterior": args.posterior,
        "seed": None if moments else args.seed,  # moments are not random
        "dtype": args.dtype,
    }
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; pass a directory")
    old = _read_meta(out) if out.is_dir() else None
    if old is not None:
        _check_same(out, old, settings, SETTINGS)
    num_shards = math.ceil(n / args.shard_size)
    ranges = [_shard_range(s, args.shard_size, n) for s in range(num_shards)]

    def pending_shards(full: dict[str, Any]) -> list[int]:
        return [s for s in range(num_shards) if not shard_is_complete(out / shard_name(s), *ranges[s], full)]

    if old is not None and "latent_shape" in old:  # settings agree: check the shards without loading the VAE
        full = {**settings, "latent_shape": old["latent_shape"]}
        if not pending_shards(full):
            if not old.get("complete"):
                old.update(complete=True, substituted=_substituted(out, num_shards, dataset))
                write_json(out / "meta.json", old)
            print(f"{out}: already complete ({n} latents in {num_shards} shards); nothing to do")
            return 0

    device = resolve_device(args.device)
    vae = load_vae(args.vae, device=device)
    factor = downsample_factor(vae)
    if args.image_size % factor:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor {factor}")
    side = args.image_size // factor
    full = {**settings, "latent_shape": [int(vae.config.latent_channels), side, side]}
    if old is not None and "latent_shape" in old:
        _check_same(out, old, full, ("latent_shape",))
    todo = pending_shards(full)
    meta = {**full, "num_shards": num_shards, "data_path": str(Path(args.data_path).resolve()), "complete": False}
    write_json(out / "meta.json", meta)  # first: an interrupted extraction says so

    batches = [  # batches never straddle two shards
        list(range(a, min(a + args.batch_size, ranges[s][1]))) for s in todo for a in range(*ranges[s], args.batch_size)
    ]
    loader = DataLoader(
        _Indexed(dataset), batch_sampler=batches, num_workers=args.num_workers, pin_memory=device.type == "cuda"
    )
    from tqdm.auto import tqdm

    done_images = n - sum(b - a for a, b in (ranges[s] for s in todo))
    bar = tqdm(total=n, initial=done_images, unit="img", desc="encoding", dynamic_ncols=True)
    buffers: dict[int, dict[str, list]] = {}
    generators: dict[int, torch.Generator] = {}
    layout = shard_layout(full)
    copies = 2 if full["flip"] else 1
    try:
        for x, y, index, src in loader:
            s = int(index[0]) // args.shard_size
            if s not in buffers:
                buffers[s] = {k: [] for k in (*layout, "labels", "index", "source")}
                generators[s] = shard_generator(args.seed, s)
            images = torch.cat([x, x.flip(-1)]) if copies == 2 else x
            mean, std = (m.cpu() for m in posterior_moments(vae, images))  # [copies * B, 4, h, w], unscaled
            buf = buffers[s]
            if moments:  # [B, 2 (image, mirror), 2 (mean, std), 4, h, w]
                buf["moments"].append(torch.stack([mean, std], 1).unflatten(0, (2, len(x))).transpose(0, 1))
            else:
                z = mean * SCALE
                if args.posterior == "sample":  # noise per image, in file order: independent of the batching
                    per_image = [torch.randn((copies, *full["latent_shape"]), generator=generators[s]) for _ in x]
                    z = sample_posterior(mean, std, torch.stack(per_image).transpose(0, 1).flatten(0, 1))
                for key, part in zip(layout, z.split(len(x))):
                    buf[key].append(part)
            buf["labels"].append(y)
            buf["index"].append(index)
            buf["source"].append(src)
            bar.update(len(x))
            start, stop = ranges[s]
            if sum(len(t) for t in buf["labels"]) == stop - start:
                bad = _write_shard(out / shard_name(s), buffers.pop(s), start, stop, full)
                generators.pop(s)
                if bad:
                    bar.write(f"{shard_name(s)}: {len(bad)} unreadable images replaced by their next readable one")
    finally:
        bar.close()

    missing = pending_shards(full)
    if missing:  # cannot happen unless files vanished under us
        raise UserError(f"{out}: shards {missing[:5]} were not written; rerun to finish")
    substituted = _substituted(out, num_shards, dataset)
    meta.update(complete=True, substituted=substituted)
    write_json(out / "meta.json", meta)
    note = f"; {len(substituted)} unreadable images were replaced (listed in meta.json)" if substituted else ""
    print(f"wrote {n} latents in {num_shards} shards ({len(todo)} encoded now) to {out}/ with meta.json{note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
