"""Latents as the reference trains on them: posterior moments sampled afresh every step, and the frozen mode.

The reference encodes every image at every step: a fresh VAE posterior sample and a random
horizontal flip per image and step. ``extract_latents`` stores the posterior moments of each
image and of its mirror image (the default), and the trainer draws the flip and the posterior
noise from the step's generator, per position in the global batch. Frozen extractions (one
stored sample, with or without flips) and shard directories written before moments existed
still train, with ``--latent-sampling frozen``.

Everything runs offline on the CPU, with a tiny randomly initialised ``AutoencoderKL``
(``tiny_vae_dir`` in conftest.py) on 64 px images (8x8x4 latents).
"""

import json

import pytest
import torch
from conftest import make_folder

from minidit import config as C
from minidit import train
from minidit.data import LatentShards, latent_x0, shard_name
from minidit.errors import UserError, run_cli
from minidit.runtime import Dist
from minidit.vae import SCALE, load_vae, posterior_moments

N = 8  # images: one global batch of 8, so every step is an epoch and sees every image once


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is fastest, and several stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def extract(data, out, vae_dir, *extra):
    from minidit.extract_latents import main

    argv = ["--data-path", str(data), "--out", str(out), "--image-size", "64", "--vae", str(vae_dir)]
    argv += ["--shard-size", "3", "--device", "cpu", "--num-workers", "0", *extra]
    return run_cli(main, argv)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_vae_dir):
    """An image folder of N images, its moments (the default extraction) and frozen samples with flips."""
    root = tmp_path_factory.mktemp("latents")
    data = make_folder(root / "imgs", counts=(3, 3, 2), size=64)
    assert extract(data, root / "moments", tiny_vae_dir) == 0
    assert extract(data, root / "frozen", tiny_vae_dir, "--posterior", "sample", "--flip") == 0
    return {"data": data, "moments": root / "moments", "frozen": root / "frozen"}


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(latents, sampling)``: a prepared Trainer on the CPU (batch N, a 1-token DiT), closed
    at the end of the test."""
    made = []

    def make(latents, sampling="fresh") -> train.Trainer:
        cfg = C.build_config(
            "toy",
            dict(
                data="latents", data_path=str(latents), image_size=64, model="DiT-Ti/8", global_batch_size=N,
                device="cpu", run_dir=str(tmp_path / f"run{len(made)}"), eval_samples=0, latent_sampling=sampling,
            ),
        )  # fmt: skip
        made.append(train.Trainer(cfg, "toy"))
        made[-1].prepare()
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def global_batch(trainer: train.Trainer, step: int, world: int, micro: int):
    """The x_0 [N, 4, 8, 8] that ``Trainer.train_step`` gives the diffusion at ``step``, and the image ids [N],
    by position in the global batch, for ``world`` processes with micro-batches of ``micro``. Each simulated
    rank runs the real ``train_step`` on its own batches (``Trainer.batches`` from ``step``, as on resuming)
    with gradient accumulation if ``micro`` asks for it; only the all-reduce of the gradients is missing,
    which does not change the inputs (``world > 1`` needs ``micro * world == N``: no DDP no_sync)."""
    x0 = torch.full((N, 4, 8, 8), float("nan"))
    ids = torch.full((N,), -1)
    real, seen = trainer.diffusion.training_losses, []

    def record(model, x_start, t, model_kwargs=None, noise=None):
        seen.append(x_start.detach().clone())
        return real(model, x_start, t, model_kwargs=model_kwargs, noise=noise)

    trainer.diffusion.training_losses = record
    try:
        for rank in range(world):
            trainer.proc = Dist(rank, rank, world)
            trainer.micro, trainer.accum = micro, N // (micro * world)
            trainer.train_step(step, trainer.batches(step))
            sampler = iter(train.RankBatches(trainer.dataset, trainer.proc, micro, trainer.cfg.seed, step * N // world))
            assert len(seen) == trainer.accum
            for a, x in enumerate(seen):
                pos = train.batch_positions(a, micro, trainer.proc)
                x0[pos], ids[pos] = x, torch.tensor(next(sampler))
            seen.clear()
    finally:
        trainer.diffusion.training_losses = real
        trainer.proc, (trainer.micro, trainer.accum) = Dist(), C.batch_layout(trainer.cfg, 1)
    assert not x0.isnan().any() and sorted(ids.tolist()) == list(range(N))
    return x0, ids, trainer.step_noise(step)[3]


# --------------------------------------------------------------------------
# Extraction: the moments of the image and of its mirror image
# --------------------------------------------------------------------------


def test_moments_of_the_image_and_its_flip_are_stored(dirs, tiny_vae_dir):
    from safetensors import safe_open

    from minidit.data import ImageFolderDataset

    meta = json.loads((dirs["moments"] / "meta.json").read_text())
    assert (meta["posterior"], meta["flip"], meta["version"], meta["seed"]) == ("moments", True, 2, None)
    with safe_open(str(dirs["moments"] / shard_name(0)), framework="pt") as f:
        assert set(f.keys()) == {"moments", "labels"}
        moments = f.get_tensor("moments")
    assert moments.shape == (3, 2, 2, 4, 8, 8) and moments.dtype == torch.float16
    # 4 tensors [4, h, w] float16 per image: 4 * 4 * 8 * 8 * 2 bytes (32 KiB at 256 px, 32x32 latents)
    assert moments[0].numel() * moments.element_size() == 4 * 4 * 8 * 8 * 2

    images = ImageFolderDataset(dirs["data"], 64)
    pixels = torch.stack([images[i][0] for i in range(N)])
    vae = load_vae(tiny_vae_dir)
    mean, std = posterior_moments(vae, pixels)
    mean_m, std_m = posterior_moments(vae, pixels.flip(-1))
    assert not torch.allclose(mean_m, mean.flip(-1), atol=1e-3)  # the mirror image's latent is not a mirrored latent
    ds = LatentShards(dirs["moments"])
    assert (ds.posterior, ds.moments, ds.flip_mode, len(ds)) == ("moments", True, "stored", N)
    assert "posterior moments of each image and its mirror image" in ds.describe()
    assert "a random flip per image and step" in ds.describe() and "no flip (--hflip off)" in ds.describe(flips=False)
    for i in range(N):
        x, y = ds[i]
        assert x.shape == (2, 2, 4, 8, 8) and x.dtype == torch.float32 and y == images.targets[i]
        for got, want in zip((x[0, 0], x[0, 1], x[1, 0], x[1, 1]), (mean[i], std[i], mean_m[i], std_m[i])):
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)  # float16 storage


def test_extract_latents_flags():
    from minidit.extract_latents import parse_args

    base = ["--data-path", "d", "--out", "o"]
    assert parse_args(base).posterior == "moments"
    assert parse_args([*base, "--mean"]).posterior == "mean"
    assert parse_args([*base, "--posterior", "sample", "--flip"]).posterior == "sample"
    with pytest.raises(UserError, match="--mean contradicts --posterior moments"):
        parse_args([*base, "--mean", "--posterior", "moments"])


# --------------------------------------------------------------------------
# latent_x0: what the trainer does with a micro-batch
# --------------------------------------------------------------------------


def test_latent_x0_flips_then_samples_the_posterior():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(5, 2, 2, 4, 3, 3, generator=g)
    moments[:, :, 1] = moments[:, :, 1].abs()  # std >= 0
    eps = torch.randn(5, 4, 3, 3, generator=g)
    flip = torch.tensor([True, False, False, True, True])
    z = latent_x0(moments, flip, eps)
    for i in range(5):
        view = moments[i, int(flip[i])]
        assert torch.equal(z[i], (view[0] + view[1] * eps[i]) * 0.18215)
    assert SCALE == 0.18215
    frozen = moments[:, :, 0]  # [B, 2, C, h, w]: the image and its mirror image
    assert torch.equal(latent_x0(frozen, flip), torch.stack([frozen[i, int(flip[i])] for i in range(5)]))
    single = frozen[:, 0]
    assert latent_x0(single, flip) is single  # no mirror image stored: as it is
    with pytest.raises(ValueError, match="posterior moments need eps"):
        latent_x0(moments, flip)


# --------------------------------------------------------------------------
# The trainer's per-step draws
# --------------------------------------------------------------------------


def test_fresh_samples_per_step_independent_of_processes_and_micro_batches(dirs, make_trainer, capsys):
    trainer = make_trainer(dirs["moments"])
    assert trainer.spec.moments and "a fresh posterior sample and a random flip" in capsys.readouterr().out
    ds = trainer.dataset
    x0, ids, flip = global_batch(trainer, 5, world=1, micro=N)
    # each position holds (mean + std * eps) * 0.18215 of its image, mirrored where the step says so
    _, _, _, flip5, eps5 = trainer.step_noise(5)
    for p in range(N):
        view = ds[int(ids[p])][0][int(flip5[p])]
        torch.testing.assert_close(x0[p], (view[0] + view[1] * eps5[p]) * SCALE, rtol=0, atol=0)
    # the same whatever the number of processes and the micro-batches (simulated ranks), and on resuming
    for world, micro in ((1, 2), (2, 4), (1, N)):
        other, other_ids, _ = global_batch(trainer, 5, world=world, micro=micro)
        assert torch.equal(other, x0) and torch.equal(other_ids, ids), (world, micro)
    # another step: other flips and another posterior sample of every image
    x1, ids1, flip1 = global_batch(trainer, 6, world=1, micro=N)
    assert not torch.equal(flip1, flip) and flip.any() and not flip.all()
    by_image = {int(i): p for p, i in enumerate(ids1)}
    for p, i in enumerate(ids.tolist()):
        q = by_image[i]
        assert not torch.allclose(x0[p], x1[q], atol=1e-3), "an image got the same latent at two steps"
        if flip[p] == flip1[q]:  # the same view of the same image: only the posterior noise differs
            assert (x0[p] - x1[q]).abs().max() <= 8 * SCALE * ds[i][0][int(flip[p]), 1].max()


def test_frozen_latents_train_as_stored(dirs, make_trainer, capsys):
    trainer = make_trainer(dirs["frozen"], sampling="frozen")
    line = capsys.readouterr().out
    assert "frozen: one posterior sample per image and one of its mirror image" in line
    assert not trainer.spec.moments and trainer.step_noise(0)[4] is None
    ds = trainer.dataset
    seen = set()
    for step in (0, 1, 2):
        x0, ids, flip = global_batch(trainer, step, world=2, micro=4)
        for p, i in enumerate(ids.tolist()):
            assert torch.equal(x0[p], ds[i][0][int(flip[p])])  # exactly the stored latent, mirrored or not
            seen.add((i, int(flip[p])))
    assert len(seen) > N  # both views of some images: the flips are not lost


def test_sampling_mode_must_fit_the_shards(dirs, tmp_path, capsys):
    argv = ["--data", "latents", "--image-size", "64", "--model", "DiT-Ti/8", "--device", "cpu"]
    argv += ["--run-dir", str(tmp_path / "run"), "--eval-samples", "0"]
    assert run_cli(train.main, [*argv, "--data-path", str(dirs["frozen"])]) == 2  # fresh is the default
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds frozen latents" in err and "--latent-sampling frozen" in err
    assert run_cli(train.main, [*argv, "--data-path", str(dirs["moments"]), "--latent-sampling", "frozen"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds posterior moments" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert C.build_config("imagenet256-xl2").latent_sampling == "fresh"


# --------------------------------------------------------------------------
# Shard directories written before moments existed
# --------------------------------------------------------------------------


def write_old_latents(root, flip: bool, n: int = 6, shard_size: int = 4):
    """A latents directory as minidit wrote them before posterior moments (format version 1): frozen,
    scaled ``latents`` (and ``latents_flip``) float16 ``[n, 4, 8, 8]``, ``labels``, and its meta.json."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 2
    for s in range(-(-n // shard_size)):
        a, b = s * shard_size, min(n, (s + 1) * shard_size)
        tensors = {"latents": torch.randn(b - a, 4, 8, 8, generator=g).half(), "labels": labels[a:b].clone()}
        if flip:
            tensors["latents_flip"] = torch.randn(b - a, 4, 8, 8, generator=g).half()
        meta = {"format": "minidit-latents", "settings": "0" * 16, "start": str(a), "stop": str(b), "substituted": "[]"}
        save_file(tensors, str(root / shard_name(s)), metadata=meta)
    meta = {
        "format": "minidit-latents", "version": 1, "vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215,
        "image_size": 64, "num_images": n, "class_names": ["a", "b"], "files_sha256": "0" * 64,
        "shard_size": shard_size, "flip": flip, "posterior": "sample", "seed": 0, "dtype": "float16",
        "latent_shape": [4, 8, 8], "num_shards": -(-n // shard_size), "data_path": "/data", "complete": True,
        "substituted": [],
    }  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.mark.parametrize("flip", [False, True])
def test_old_shard_directories_still_load_and_train(tmp_path, flip, capsys):
    from safetensors.torch import load_file

    old = write_old_latents(tmp_path / "old", flip)
    ds = LatentShards(old)
    assert (ds.posterior, ds.moments, ds.flip_mode) == ("sample", False, "stored" if flip else "none")
    stored = load_file(str(old / shard_name(1)))
    x, y = ds[5]
    assert y == 1
    assert torch.equal(x, torch.stack([stored["latents"][1], stored["latents_flip"][1]]).float() if flip
                       else stored["latents"][1].float())  # fmt: skip
    argv = ["--data", "latents", "--data-path", str(old), "--image-size", "64", "--model", "DiT-Ti/8"]
    argv += ["--device", "cpu", "--global-batch-size", "2", "--max-steps", "2", "--sample-every", "0"]
    argv += ["--eval-samples", "0", "--vae", str(tmp_path / "no_vae"), "--run-dir", str(tmp_path / "run")]
    assert run_cli(train.main, [*argv, "--latent-sampling", "frozen"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("latents: ")]
    assert len(lines) == 1 and "frozen: one posterior sample per image" in lines[0]
    assert ("random flips" in lines[0]) == flip and ("NO horizontal flips" in lines[0]) != flip
    assert "no flips (--hflip off)" in ds.describe(flips=False)


def test_old_latent_run_directories_resume_with_frozen_sampling():
    """A run directory saved before ``latent_sampling`` existed trained on frozen latents."""
    old = C.to_dict(C.build_config("imagenet256-xl2"))
    del old["latent_sampling"]
    assert C.differences(old, C.build_config("imagenet256-xl2", {"latent_sampling": "frozen"})) == []
    assert C.differences(old, C.build_config("imagenet256-xl2")) == ["latent_sampling: 'frozen' there, 'fresh' here"]
    toy = C.to_dict(C.build_config("toy"))
    del toy["latent_sampling"]
    assert C.differences(toy, C.build_config("toy")) == []
