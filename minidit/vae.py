"""The Stable Diffusion VAE that DiT works in: images <-> latents (via diffusers' ``AutoencoderKL``).

DiT never sees pixels: a ``[B, 3, H, W]`` image in [-1, 1] is encoded to a
``[B, 4, H/8, W/8]`` latent and multiplied by ``SCALE = 0.18215`` (which gives the
latents roughly unit variance); sampled latents are divided by it before decoding.
The encoder gives a diagonal Gaussian posterior (``posterior_moments``: mean and std);
a latent is a sample of it, ``z = (mean + std * eps) * SCALE`` (``sample_posterior``).
The paper uses ``stabilityai/sd-vae-ft-ema`` ("ema", the default) or ``-mse``.

``"toy"`` names a tiny ``AutoencoderKL`` shipped in ``data/toy_vae/`` (about 1 MB), trained on the toy
shapes by ``python -m minidit.vae train-toy``: 32 px images -> ``[4, 4, 4]`` latents (downsample 8 and
4 channels, the SD VAE's 48x compression), so encode -> train a DiT on latents -> sample -> decode
runs offline on a CPU. Its latent space is rescaled after training so that ``SCALE`` gives its
latents unit standard deviation too: every latent code path (extraction, training, sampling) works
with it unchanged.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ArgumentParser, UserError, positive_int, run_cli

#: The latent scale factor of the SD VAE (``vae.config.scaling_factor``), as the reference hard-codes it.
SCALE = 0.18215

#: Short names for the two VAEs the DiT paper uses, and their Hugging Face ids.
VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}

#: The shipped toy VAE (``--vae toy``) and the command that rebuilds it.
TOY_VAE_DIR = Path(__file__).resolve().parents[1] / "data" / "toy_vae"
TOY_VAE_COMMAND = "python -m minidit.vae train-toy"
TOY_IMAGE_SIZE = 32  # the toy VAE's image side: 32 px -> 4 x 4 x 4 latents

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_vae(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """``(source, subfolder)`` for ``from_pretrained``: a Hugging Face id, or an absolute local directory.

    ``"ema"`` / ``"mse"`` map to ``VAE_IDS``; ``"toy"`` to ``TOY_VAE_DIR`` (the shipped toy VAE);
    an existing path is a local directory (a pipeline directory with a ``vae/`` subfolder works too);
    ``owner/name`` is a hub id.
    """
    name = str(name_or_path)
    if name in VAE_IDS:
        return VAE_IDS[name], None
    if name == "toy":
        if not (TOY_VAE_DIR / "config.json").is_file():
            raise UserError(f"VAE toy: {TOY_VAE_DIR} is missing; rebuild it with {TOY_VAE_COMMAND}")
        return str(TOY_VAE_DIR), None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"VAE {name}: is a file; pass the directory holding config.json and the weights")
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            return str(path.resolve()), "vae"
        return str(path.resolve()), None
    if _HUB_ID.fullmatch(name) and not name.startswith((".", "/", "~")):
        return name, None
    raise UserError(
        f"VAE {name}: no such directory; pass 'ema', 'mse', a Hugging Face id, or a local directory "
        "written by AutoencoderKL.save_pretrained"
    )


def load_vae(name_or_path: str | os.PathLike = "ema", device: str | torch.device = "cpu", dtype=torch.float32) -> Any:
    """An ``AutoencoderKL`` in eval mode, without gradients, on ``device`` in ``dtype``.

    ``name_or_path``: ``"ema"`` (default) or ``"mse"`` (``VAE_IDS``), a Hugging Face id, or a
    local directory (``save_pretrained`` output, or a pipeline directory with ``vae/``).
    Raises ``UserError`` (one line) if diffusers is missing or the VAE cannot be loaded
    (offline, unknown id, broken directory), saying how to use a local copy.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the VAE needs diffusers: pip install diffusers (or pip install -e '.[diffusers]')") from None
    source, subfolder = resolve_vae(name_or_path)
    # without accelerate, say so to diffusers instead of letting it warn about it on every load
    options = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    try:
        try:  # a local directory or a cached download: no network at all (and no retries when offline)
            vae = AutoencoderKL.from_pretrained(
                source, subfolder=subfolder, torch_dtype=dtype, local_files_only=True, **options
            )
        except Exception:
            if os.path.isabs(source):
                raise
            vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, **options)
    except Exception as e:  # hub and file errors come in many types (OSError, ValueError, HTTP errors, ...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = (lines[0] if lines else type(e).__name__)[:300].rstrip(".")
        hub_id = source if not os.path.isabs(source) else VAE_IDS["ema"]
        raise UserError(
            f"could not load the VAE {source!r}: {reason}. Without internet, fetch it where you have one "
            f"(e.g. huggingface-cli download {hub_id} --local-dir DIR) and pass that directory instead"
        ) from None
    return vae.to(device=device).eval().requires_grad_(False)


def downsample_factor(vae: Any) -> int:
    """How much the VAE shrinks each side: 8 for the SD VAE (one halving per encoder block but the last)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def posterior_moments(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> ``(mean, std)`` of the VAE's diagonal Gaussian posterior,
    each ``[B, 4, H/8, W/8]`` float32, *unscaled* (``sample_posterior`` applies ``SCALE``).

    ``std`` is diffusers' ``exp(logvar / 2)`` with ``logvar`` clamped to [-30, 20]. Runs without
    gradients, on the VAE's device and dtype.
    """
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A scaled latent drawn from posterior moments: ``z = (mean + std * noise) * SCALE``.

    ``mean``, ``std``: ``[B, 4, h, w]`` unscaled (``posterior_moments``); ``noise``: standard normal,
    same shape. The reference's ``latent_dist.sample().mul_(0.18215)``, with the noise passed in:
    extraction and the trainer (a fresh ``noise`` per image and step) both draw latents with it.
    """
    return (mean + std * noise) * SCALE


@torch.no_grad()
def encode(
    vae: Any,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, 4, H/8, W/8]`` (float32).

    The posterior is a diagonal Gaussian; ``sample=True`` draws ``mean + std * noise``
    (noise from ``generator``, or the given standard-normal ``noise [B, 4, H/8, W/8]``),
    as the reference's training script does; ``sample=False`` takes the mean. The result
    is multiplied by ``SCALE``. Runs without gradients, on the VAE's device and dtype
    (the sample itself is computed in float32).
    """
    mean, std = posterior_moments(vae, images)
    if not sample:
        return mean * SCALE
    if noise is None:
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device)
    if noise.shape != mean.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)}, expected {tuple(mean.shape)}")
    return sample_posterior(mean, std, noise.to(mean))


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, 4, h, w]`` -> images ``[B, 3, 8h, 8w]`` (float32), in [-1, 1] up to the
    VAE's small overshoot (not clamped): ``vae.decode(latents / SCALE)``. Runs without gradients."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / SCALE
    return vae.decode(z).sample.float()


# ---------------------------------------------------------------------------------------------------------------
# The toy VAE: a tiny AutoencoderKL trained on the toy shapes


def toy_vae_config() -> dict[str, Any]:
    """The ``AutoencoderKL`` settings of the toy VAE: four encoder blocks (downsample 8), 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": TOY_IMAGE_SIZE,
        "scaling_factor": SCALE,
    }


@torch.no_grad()
def _calibrate(vae: Any, images: torch.Tensor, generator: torch.Generator) -> float:
    """Rescale the latent space in place so that posterior samples times ``SCALE`` have unit std.

    With ``a = 1 / (SCALE * std(z))`` (``z`` posterior samples of ``images``, all elements, the
    LDM estimate), the encoder's ``quant_conv`` outputs ``a * mean`` and ``logvar + 2 ln a`` and the
    decoder's ``post_quant_conv`` divides its input by ``a``: the same autoencoder, latents ``a``
    times larger. Returns ``std(z)`` before the rescaling.
    """
    mean, std = posterior_moments(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=generator)
    a = 1.0 / (SCALE * float(z.flatten().std()))
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= a
    vae.quant_conv.bias[:c] *= a
    vae.quant_conv.bias[c:] += 2 * math.log(a)
    vae.post_quant_conv.weight *= 1 / a  # [out, in, 1, 1]: scales the input latents back
    return float(z.flatten().std())


def reconstruction_error(vae: Any, images: torch.Tensor) -> float:
    """Mean absolute error (in [-1, 1] units) of ``decode(encode(images, sample=False))``, in float32."""
    return float((decode(vae, encode(vae, images, sample=False)) - images).abs().mean())


def train_toy_vae(
    out: str | os.PathLike = TOY_VAE_DIR,
    steps: int = 700,
    batch_size: int = 16,
    seed: int = 0,
    kl_weight: float = 1e-4,
    lr: float = 1e-3,
    held_out: int = 512,
) -> dict[str, Any]:
    """Train the toy VAE on 32 px toy shapes and save it (``save_pretrained``, safetensors) to ``out``.

    Loss per batch: ``mean (x - x_hat)^2`` (MSE, pixels in [-1, 1]; an L1 loss stalls at the flat
    background, the median of most pixels) plus ``kl_weight`` times the KL
    divergence of the posterior from N(0, I) per latent element; ``x_hat`` decodes a posterior
    sample. AdamW at ``lr`` with a cosine decay to 0, images of toy seed ``seed`` (indices
    ``step * batch_size ...``). Then the latent space is calibrated to ``SCALE`` (``_calibrate``)
    and the reconstruction error (posterior mean) is measured on ``held_out`` held-out images.
    Returns ``{"path", "error", "raw_std", "seconds", "steps"}``.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from . import toy

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**toy_vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.time()
    bar = tqdm(range(steps), desc="toy VAE", dynamic_ncols=True)
    for step in bar:
        x, _ = toy.make_batch(torch.arange(step * batch_size, (step + 1) * batch_size), seed, TOY_IMAGE_SIZE)
        posterior = vae.encode(x).latent_dist
        mean, std = posterior.mean, posterior.std
        z = mean + std * torch.randn(mean.shape, generator=generator)
        x_hat = vae.decode(z).sample
        rec = (x_hat - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).mean()
        loss = rec + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    test_images, _ = toy.make_batch(torch.arange(held_out) + toy.HELD_OUT_START, seed, TOY_IMAGE_SIZE)
    raw_std = _calibrate(vae, test_images, generator)
    error = reconstruction_error(vae, test_images)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"path": out, "error": error, "raw_std": raw_std, "seconds": time.time() - start, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m minidit.vae", description="The toy VAE (--vae toy).")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-toy", help="train the toy VAE on 32 px toy shapes and save it")
    train.add_argument("--steps", type=positive_int, default=700, help="optimizer steps (default 700)")
    train.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    train.add_argument("--seed", type=int, default=0, help="data, noise and initialisation seed (default 0)")
    train.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight per latent element (default 1e-4)")
    train.add_argument("--held-out", type=positive_int, default=512, help="images to measure on (default 512)")
    train.add_argument("--out", type=Path, default=TOY_VAE_DIR, help="directory (default data/toy_vae)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file; pass a directory")
    result = train_toy_vae(args.out, args.steps, args.batch_size, args.seed, args.kl_weight, held_out=args.held_out)
    print(
        f"wrote {result['path']} in {result['seconds']:.0f} s: reconstruction error (mean |x - x_hat|, {args.held_out} "
        f"held-out images) {result['error']:.4f}; latent std before calibration {result['raw_std']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
