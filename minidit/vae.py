"""The Stable Diffusion VAE that DiT works in: images <-> latents (via diffusers' ``AutoencoderKL``).

DiT never sees pixels: a ``[B, 3, H, W]`` image in [-1, 1] is encoded to a
``[B, 4, H/8, W/8]`` latent and multiplied by ``SCALE = 0.18215`` (which gives the
latents roughly unit variance); sampled latents are divided by it before decoding.
The encoder gives a diagonal Gaussian posterior (``posterior_moments``: mean and std);
a latent is a sample of it, ``z = (mean + std * eps) * SCALE`` (``sample_posterior``).
The paper uses ``stabilityai/sd-vae-ft-ema`` ("ema", the default) or ``-mse``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

#: The latent scale factor of the SD VAE (``vae.config.scaling_factor``), as the reference hard-codes it.
SCALE = 0.18215

#: Short names for the two VAEs the DiT paper uses, and their Hugging Face ids.
VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_vae(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """``(source, subfolder)`` for ``from_pretrained``: a Hugging Face id, or an absolute local directory.

    ``"ema"`` / ``"mse"`` map to ``VAE_IDS``; an existing path is a local directory (a
    pipeline directory with a ``vae/`` subfolder works too); ``owner/name`` is a hub id.
    """
    name = str(name_or_path)
    if name in VAE_IDS:
        return VAE_IDS[name], None
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
