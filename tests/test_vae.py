"""Tests of the toy VAE (``--vae toy``): the shipped ``data/toy_vae/`` loads offline and reconstructs toy
images; ``train-toy``'s calibration rescales the latent space without changing the autoencoder.

The reconstruction bound is the error recorded in data/README.md for the shipped weights, with a margin
for platform rounding; reconstructions are also compared with a blank image and with another image, so
a VAE that ignores its input cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from minidit import toy, vae  # noqa: E402
from minidit.errors import UserError, run_cli  # noqa: E402

#: data/README.md records 0.0642 for the shipped toy VAE (512 held-out images); the bound leaves a margin.
RECONSTRUCTION_BOUND = 0.08


@pytest.fixture(scope="module")
def toy_vae():
    return vae.load_vae("toy")


def test_toy_resolves_to_the_shipped_directory():
    source, subfolder = vae.resolve_vae("toy")
    assert Path(source) == vae.TOY_VAE_DIR and subfolder is None
    assert (vae.TOY_VAE_DIR / "config.json").is_file()
    assert (vae.TOY_VAE_DIR / "diffusion_pytorch_model.safetensors").is_file()


def test_missing_toy_vae_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(vae, "TOY_VAE_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="python -m minidit.vae train-toy"):
        vae.resolve_vae("toy")


def test_shipped_toy_vae_is_small_and_has_the_sd_layout(toy_vae):
    size = sum(f.stat().st_size for f in vae.TOY_VAE_DIR.iterdir())
    assert size < 5 * 2**20
    assert vae.downsample_factor(toy_vae) == 8 and toy_vae.config.latent_channels == 4
    assert toy_vae.config.scaling_factor == vae.SCALE


def test_shipped_toy_vae_reconstructs_toy_images(toy_vae):
    images, _ = toy.make_batch(torch.arange(64) + toy.HELD_OUT_START + 10_000, seed=5, image_size=32)
    latents = vae.encode(toy_vae, images, sample=False)
    assert latents.shape == (64, 4, 4, 4) and latents.dtype == torch.float32
    recon = vae.decode(toy_vae, latents)
    assert recon.shape == images.shape
    error = (recon - images).abs().mean().item()
    assert error < RECONSTRUCTION_BOUND
    # far better than the trivial answers: the background alone, or the next image's reconstruction
    assert error < 0.5 * (images - toy.BACKGROUND * 2 + 1).abs().mean().item()
    assert error < 0.5 * (recon.roll(1, 0) - images).abs().mean().item()


def test_shipped_toy_vae_latents_have_about_unit_std_after_scaling(toy_vae):
    images, _ = toy.make_batch(torch.arange(256), seed=6, image_size=32)
    z = vae.encode(toy_vae, images, generator=torch.Generator().manual_seed(0))
    assert 0.8 < z.std().item() < 1.25


def test_calibration_rescales_latents_and_keeps_the_autoencoder(tiny_vae_dir):
    model = vae.load_vae(tiny_vae_dir)
    images, _ = toy.make_batch(torch.arange(16), seed=0, image_size=32)
    before = vae.decode(model, vae.encode(model, images, sample=False))
    mean0, std0 = vae.posterior_moments(model, images)
    raw = vae._calibrate(model, images, torch.Generator().manual_seed(0))
    mean1, std1 = vae.posterior_moments(model, images)
    a = 1 / (vae.SCALE * raw)
    assert a != pytest.approx(1, abs=0.05)  # the test means something: the tiny VAE is far from calibrated
    torch.testing.assert_close(mean1, a * mean0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std1, a * std0, rtol=1e-4, atol=1e-6)
    z = mean1 + std1 * torch.randn(mean1.shape, generator=torch.Generator().manual_seed(0))
    assert (z * vae.SCALE).flatten().std().item() == pytest.approx(1, rel=1e-4)
    after = vae.decode(model, vae.encode(model, images, sample=False))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_train_toy_writes_a_loadable_vae(tmp_path, capsys):
    out = tmp_path / "vae"
    assert (
        run_cli(vae.main, ["train-toy", "--steps", "2", "--batch-size", "4", "--held-out", "8", "--out", str(out)]) == 0
    )
    assert "reconstruction error" in capsys.readouterr().out
    model = vae.load_vae(out)
    assert model.config.block_out_channels == list(vae.toy_vae_config()["block_out_channels"])
    assert not out.with_name("vae.tmp").exists()


def test_train_toy_refuses_a_file_as_out(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run_cli(vae.main, ["train-toy", "--out", str(target)]) != 0
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_extract_latents_with_the_toy_vae(tmp_path):
    """--vae toy goes through the same extraction as the SD VAE: 32 px images -> moments of 4x4x4 latents,
    equal to the toy VAE's posterior moments of the same PNGs (stored in float16)."""
    import numpy as np
    from PIL import Image

    from minidit.data import ImageFolderDataset, LatentShards
    from minidit.extract_latents import main as extract

    images, labels = toy.make_batch(torch.arange(6), seed=4, image_size=32)
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = tmp_path / "images" / f"c{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.png")
    argv = ["--data-path", str(tmp_path / "images"), "--out", str(tmp_path / "lat"), "--vae", "toy"]
    assert run_cli(extract, [*argv, "--image-size", "32", "--num-workers", "0", "--device", "cpu"]) == 0
    shards = LatentShards(tmp_path / "lat")
    assert shards.latent_shape == (4, 4, 4) and len(shards) == 6
    x, _ = shards[0]
    model = vae.load_vae("toy")
    pixels = ImageFolderDataset(tmp_path / "images", 32)[0][0][None]
    mean, std = vae.posterior_moments(model, pixels)
    torch.testing.assert_close(x[0, 0], mean[0], atol=2e-2, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(x[0, 1], std[0], atol=2e-3, rtol=2e-3)
