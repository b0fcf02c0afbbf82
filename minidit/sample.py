"""Sample from a DiT: ``python -m minidit.sample`` (lesson 07).

    python -m minidit.sample --ckpt runs/toy --classes "red circle,blue square"   # -> runs/toy/samples/
    python -m minidit.sample --ckpt DiT-XL-2-256x256.pt --classes "golden retriever,207" --out grid.png
    torchrun --nproc_per_node 8 -m minidit.sample --ckpt DiT-XL-2-256x256.pt --num-samples 50000 \\
        --cfg-scale 1.5 --npz samples.npz        # the .npz that the ADM evaluator reads

Checkpoints: a minidit run directory or training checkpoint (EMA weights, rebuilt from the run's
config), the released DiT-XL/2 weights by name, or any file/directory ``minidit.checkpoint`` reads.
Latent models (4 input channels) are decoded with the Stable Diffusion VAE (``--vae``).

Outputs: a run's samples go to ``<run dir>/samples/`` unless ``--out`` (the grid) or ``--npz`` say
where; other checkpoints need them. Sample i's noise (x_T and every step's) comes from its own
generator, seeded by (``--seed``, i): the images do not depend on the batch size or on the number of
processes. ``--num-samples N`` writes each batch as a shard into ``<npz>.shards/`` as it goes (every
process its own batches), then merges the shards into the ``.npz``; the same command after a crash
skips the shards already written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import model_from_state_dict, read_checkpoint
from .diffusion import create_diffusion
from .errors import ArgumentParser, UserError, positive_int, run_cli
from .fileio import atomic_write, save_npz, write_json
from .flow import FlowMatching
from .model import DiT
from .runtime import cpu_threads, dist_from_env, init_distributed, resolve_device, sample_generator

#: The reference sampler's example classes (ImageNet ids).
DEFAULT_IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def check_guidance(model: DiT, cfg_scale: float) -> None:
    """Refuse a guidance scale that is not finite and >= 0, or guidance on a model without a null class."""
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise UserError(f"--cfg-scale {cfg_scale}: the guidance scale must be a finite number >= 0 (1: no guidance)")
    if cfg_scale != 1 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        raise UserError(
            f"--cfg-scale {cfg_scale:g}: this model was trained without label dropout (class_dropout_prob 0), so it "
            "has no null class and classifier-free guidance is impossible; use --cfg-scale 1"
        )


def check_steps(num_steps: int, diffusion_steps: int) -> None:
    """Sampling takes 2..T respaced steps of a model trained with T diffusion steps."""
    if not 2 <= num_steps <= diffusion_steps:
        raise UserError(f"--num-steps {num_steps}: must be in 2..{diffusion_steps} (the model's diffusion steps)")


def check_sampler(sampler: str | None, objective: str) -> str:
    """The sampler for a model trained with ``objective`` (None: ddpm, or euler for flow); one line if it cannot."""
    samplers = ("euler", "heun") if objective == "flow" else ("ddpm", "ddim")
    if sampler is None:
        return samplers[0]
    if sampler not in samplers:
        raise UserError(
            f"--sampler {sampler}: this model was trained with --objective {objective}: choose {' or '.join(samplers)}"
        )
    return sampler


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    num_steps: int = 250,
    sampler: str | None = None,
    seed: int = 0,
    guided_channels: int | None = 3,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_denoised: bool = False,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    objective: str = "ddpm",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-conditional samples: labels [N] -> images [N, *model.sample_shape] (decoded to [-1, 1] when
    ``decoder``): [N, C, H, W] for a DiT, videos [N, C, F, H, W] for ``minidit.video.VideoDiT``.

    DDPM (ancestral, learned variance) or DDIM (eta = 0) over ``num_steps`` respaced
    steps; classifier-free guidance with ``cfg_scale`` (1: none) on ``guided_channels``
    (3, the reference; None: all). Sample i's noise comes from ``sample_generator(seed, indices[i])``
    (default indices 0..N-1), so a sample is the same in any batch. Raises ``UserError`` if a
    sample is not finite (broken weights). ``objective="flow"`` (a ``--objective flow`` run): Euler (default) or
    Heun over ``num_steps`` steps from t = 1 to 0, guided on all channels (the velocity; see ``minidit.flow``).
    """
    sampler = check_sampler(sampler, objective)
    check_guidance(model, cfg_scale)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices)
    if objective == "flow":
        flow, guided_channels = FlowMatching(num_steps), None
        loop = flow.euler_sample_loop if sampler == "euler" else flow.heun_sample_loop
    else:
        check_steps(num_steps, diffusion_steps)
        diffusion = create_diffusion(str(num_steps), noise_schedule, model.learn_sigma, diffusion_steps)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    was_training = model.training
    model.eval()
    out = []
    for y, idx in zip(labels.split(batch_size), indices.split(batch_size)):
        generators = [sample_generator(seed, int(i), device) for i in idx]  # every draw of sample i, any batch
        y = y.to(device)
        z = torch.stack([torch.randn(model.sample_shape, generator=g, device=device) for g in generators])
        kw = dict(progress=progress, clip_denoised=clip_denoised, generator=generators)
        if cfg_scale == 1.0:
            x = loop(model, z.shape, z, model_kwargs=dict(y=y), **kw)
        else:
            null = torch.full_like(y, model.num_classes)
            fn = partial(model.forward_with_cfg, guided_channels=guided_channels)
            z2 = torch.cat([z, z])
            x = loop(fn, z2.shape, z2, model_kwargs=dict(y=torch.cat([y, null]), cfg_scale=cfg_scale), **kw)[: len(y)]
        x = decoder(x) if decoder is not None else x
        if not torch.isfinite(x).all():
            raise UserError(f"samples {int(idx[0])}..{int(idx[-1])} hold NaN/inf values: the weights are broken")
        out.append(x.clamp(-1, 1) if decoder is not None else x)
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
    """A model in eval mode, plus what is known about it: ``class_names``, ``latent``, ``train_config``
    (a minidit run's config, or {}), ``run_dir`` (None unless a minidit run)."""
    sd, meta = read_checkpoint(ckpt, input_size=image_size // 8 if image_size else None)
    model = model_from_state_dict(sd, str(ckpt), **meta["dit"])
    info = {"train_config": meta["train_config"] or {}, "run_dir": meta["run_dir"], "latent": model.in_channels == 4}
    names = meta["class_names"]
    if names is None:
        data = info["train_config"].get("data")
        if data == "toy":
            from . import toy

            names = list(toy.CLASS_NAMES)
        elif data == "cifar10":
            names = CIFAR10_CLASSES
        elif model.num_classes == 1000:
            names = imagenet_class_names()
        else:
            names = [str(i) for i in range(model.num_classes)]
    info["class_names"] = names
    return model, info


def parse_classes(spec: str, names: list[str]) -> list[int]:
    """ "207,golden retriever, red circle" -> class ids; names match case-insensitively."""
    from .errors import closest

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
            close = closest(item.lower(), lower)
            hint = f" (did you mean {names[lower.index(close)]!r}?)" if close else ""
            raise UserError(f"unknown class {item!r}{hint}")
    if not ids:
        raise UserError("--classes is empty")
    return ids


# --------------------------------------------------------------------------
# Many samples: shards on disk, merged into one .npz
# --------------------------------------------------------------------------


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of the weights (names, shapes, sums), recorded with the shards."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().double()
        h.update(f"{k}{tuple(v.shape)}{v.sum().item():.17g}{v.abs().sum().item():.17g}".encode())
    return h.hexdigest()[:16]


def shard_dir(npz: str | os.PathLike) -> Path:
    return Path(f"{npz}.shards")


def _check_settings(shards: Path, settings: dict) -> None:
    """Refuse shards that another command wrote; record ours. Every process checks before any is written."""
    path = shards / "settings.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
        diff = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in settings.items() if saved.get(k) != v]
        if diff:
            raise UserError(
                f"{shards} holds samples made with other settings ({'; '.join(diff[:3])}): pass the same settings "
                "to continue them, or delete that directory to start over"
            )


def write_shards(model: DiT, labels: torch.Tensor, npz: str, settings: dict, gen: dict, batch_size: int) -> None:
    """Generate sample i for every i in 0..N-1 (N = len(labels)) into shard files of ``batch_size``
    samples, ``<npz>.shards/<first index>.npz`` (uint8 ``images`` [n, H, W, 3], ``labels`` [n]),
    written atomically as each batch is done: memory stays flat in N. Under torch.distributed, the
    missing shards are dealt out to the processes in turn. Shards already there are kept."""
    import torch.distributed as dist

    from .plots import to_uint8

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shards = shard_dir(npz)
    _check_settings(shards, settings)
    if distributed:
        dist.barrier()  # every process has checked the settings before they are written
    if rank == 0:
        write_json(shards / "settings.json", settings, indent=1)
    n = len(labels)
    todo = [s for s in range(0, n, batch_size) if not (shards / f"{s:08d}.npz").is_file()]
    if distributed:
        dist.barrier()  # every process has listed the missing shards before any is written
    if rank == 0:
        done = n - sum(min(batch_size, n - s) for s in todo)
        print(f"sampling {n} images into {shards}/: {done} already there, {n - done} to go ({world} process(es))")
    for start in tqdm(todo[rank::world], desc="sampling", unit="batch", disable=rank != 0, dynamic_ncols=True):
        idx = torch.arange(start, min(start + batch_size, n))
        pixels = to_uint8(generate(model, labels[idx], indices=idx, batch_size=len(idx), **gen).cpu()).numpy()
        save_npz(shards / f"{start:08d}.npz", images=pixels, labels=labels[idx].numpy())
    if distributed:
        dist.barrier()


def merge_shards(npz: str, n: int, batch_size: int, out_dir: str | None = None) -> tuple[int, ...]:
    """Stream the shards, in order, into ``npz`` (``arr_0`` uint8 [N, H, W, 3], ``labels`` [N]; the ADM
    evaluator's format) without holding them all in memory; then delete the shards. Returns arr_0's shape."""
    shards = shard_dir(npz)
    files = [shards / f"{s:08d}.npz" for s in range(0, n, batch_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{shards}: shards {', '.join(missing[:3])} are missing; run the same command again")
    with np.load(files[0]) as first:
        shape = (n, *first["images"].shape[1:])
    labels = []

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i, path in enumerate(files):
                    with np.load(path) as shard:
                        images = shard["images"]
                        labels.append(shard["labels"])
                    f.write(np.ascontiguousarray(images).tobytes())
                    if out_dir:
                        from PIL import Image

                        for j, (img, y) in enumerate(zip(images, labels[-1])):
                            Image.fromarray(img).save(os.path.join(out_dir, f"{i * batch_size + j:06d}_{y}.png"))
            buffer = io.BytesIO()
            np.save(buffer, np.concatenate(labels))
            zf.writestr("labels.npy", buffer.getvalue())

    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    atomic_write(npz, write)
    shutil.rmtree(shards)
    return shape


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m minidit.sample", description="Sample a grid, or N samples for FID, from a DiT.")
    p.add_argument(
        "--ckpt", required=True, help="run directory, checkpoint file, diffusers dir, or DiT-XL-2-256x256.pt"
    )
    p.add_argument("--classes", default="", help="comma-separated class ids or names (default: a few per dataset)")
    p.add_argument("--per-class", type=positive_int, default=4, help="samples per class in the grid (default: 4)")
    p.add_argument("--num-samples", type=positive_int, help="N samples of random classes for FID (no grid)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale >= 0; 1: none (default: 4; FID: 1.5)")
    p.add_argument("--guided-channels", help="1-4 or 'all' (default: 3, the reference; flow runs: all, always)")
    p.add_argument("--num-steps", type=positive_int, default=250, help="sampling steps, respaced (default: 250)")
    samplers = ("ddpm", "ddim", "euler", "heun")
    p.add_argument("--sampler", choices=samplers, help="flow runs: euler or heun (default: ddpm; flow runs: euler)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise is seeded by (seed, i) (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per batch and shard (default: 32)")
    p.add_argument("--image-size", type=int, choices=(256, 512), help="for a diffusers file without its config")
    p.add_argument("--vae", default="ema", help="latent models: ema, mse, toy or an AutoencoderKL dir (default: ema)")
    p.add_argument("--out", help="the grid PNG (default for a run: <run dir>/samples/grid_<settings>.png)")
    p.add_argument("--out-dir", help="also write one PNG per sample here")
    p.add_argument(
        "--npz", help="uint8 samples and labels, the ADM evaluator's format (default for a run with --num-samples: "
        "<run dir>/samples/<N>_<settings>.npz)"
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto: CUDA, MPS or CPU)")
    return p


def default_outputs(args: argparse.Namespace, run_dir: Path | None) -> None:
    """Fill in ``args.out`` / ``args.npz``: under ``<run dir>/samples/`` for a run; others must say where."""
    tag = f"cfg{args.cfg_scale:g}_{args.sampler}{args.num_steps}_seed{args.seed}"
    if args.num_samples:
        if args.npz is None and run_dir is None:
            raise UserError(f"--ckpt {args.ckpt} is not a minidit run: say where the samples go with --npz FILE")
        args.npz = args.npz or str(run_dir / "samples" / f"{args.num_samples}_{tag}.npz")
    elif args.out is None:
        if run_dir is None:
            raise UserError(f"--ckpt {args.ckpt} is not a minidit run: say where the grid goes with --out FILE.png")
        args.out = str(run_dir / "samples" / f"grid_{tag}.png")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.guided_channels not in (None, "all", "1", "2", "3", "4"):
        raise UserError(f"--guided-channels {args.guided_channels!r}: use 1-4 or 'all'")
    guided = None if args.guided_channels == "all" else int(args.guided_channels or 3)
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UserError(f"--cfg-scale {args.cfg_scale}: the guidance scale must be a finite number >= 0 (1: none)")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    if args.num_samples and args.out:
        raise UserError("--out is the class grid, which --num-samples does not make: use --npz (and --out-dir)")
    proc = dist_from_env()
    device = resolve_device(args.device, proc.local_rank)
    model, info = load_for_sampling(args.ckpt, args.image_size)
    objective = info["train_config"].get("objective", "ddpm")
    args.sampler = check_sampler(args.sampler, objective)
    if objective == "flow" and args.guided_channels not in (None, "all"):
        raise UserError(f"--guided-channels {args.guided_channels}: a flow model is guided on all its channels")
    default_outputs(args, info["run_dir"])
    if device.type == "cpu":  # as the trainer: threads that cannot oversubscribe the cores (1 on a busy machine)
        torch.set_num_threads(cpu_threads(0, proc.local_world_size)[0])
    trained = info["train_config"]  # a minidit run knows its schedule; released weights use the default
    schedule, steps = trained.get("noise_schedule", "linear"), trained.get("diffusion_steps", 1000)
    if objective != "flow":
        check_steps(args.num_steps, steps)
    check_guidance(model, args.cfg_scale)
    model.to(device)
    names = info["class_names"]
    decoder, clip = None, True
    if info["latent"]:
        from . import vae

        v = vae.load_vae(args.vae, device=device)
        decoder, clip = partial(vae.decode, v), False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.set_device(device)
    gen = dict(
        cfg_scale=args.cfg_scale, num_steps=args.num_steps, sampler=args.sampler, seed=args.seed,
        guided_channels=guided, decoder=decoder, clip_denoised=clip, noise_schedule=schedule,
        diffusion_steps=steps, objective=objective, device=device,
    )  # fmt: skip

    if args.num_samples:  # the FID protocol: uniformly random classes
        labels = torch.randint(
            0, model.num_classes, (args.num_samples,), generator=torch.Generator().manual_seed(args.seed)
        )
        settings = {
            "weights": weights_fingerprint(model), "num_samples": args.num_samples, "batch_size": args.batch_size,
            **{k: v for k, v in gen.items() if k not in ("decoder", "device")},
            "vae": args.vae if info["latent"] else None,
        }  # fmt: skip
        import torch.distributed as dist

        init_distributed(device)  # under torchrun: the process group the shards are dealt over
        try:
            write_shards(model, labels, args.npz, settings, gen, args.batch_size)
            if proc.is_main:
                shape = merge_shards(args.npz, args.num_samples, args.batch_size, args.out_dir)
                pngs = f", {args.out_dir}/ ({shape[0]} PNGs)" if args.out_dir else ""
                print(f"wrote {args.npz} ({shape[0]} images {shape[1]}x{shape[2]}, uint8){pngs}")
        finally:
            if proc.world_size > 1:
                dist.destroy_process_group()
        return 0

    if not proc.is_main:  # a grid is small: one process draws it
        return 0
    if args.classes:
        classes = parse_classes(args.classes, names)
    else:
        classes = DEFAULT_IMAGENET_CLASSES if model.num_classes == 1000 else list(range(min(model.num_classes, 10)))
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images = generate(model, labels, batch_size=args.batch_size, progress=True, **gen).cpu()
    from .plots import save_class_grid, to_uint8

    pixels = to_uint8(images).numpy()
    title = f"CFG {args.cfg_scale:g}, {args.sampler} {args.num_steps}"
    save_class_grid(images, [names[c] for c in classes], args.per_class, args.out, title=title)
    written = [args.out]
    if args.npz:
        save_npz(args.npz, arr_0=pixels, labels=labels.numpy())
        written.append(f"{args.npz} ({pixels.shape[0]} images {pixels.shape[1]}x{pixels.shape[2]}, uint8)")
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
