"""python -m minidit.sample: grids, single PNGs, the ADM .npz, class names, latent models with a VAE."""

import numpy as np
import pytest
import torch
from conftest import perturbed

import minidit
from minidit import sample, train
from minidit.checkpoint import save_checkpoint
from minidit.errors import UserError, run_cli

TINY = [
    "--model", "DiT-Ti/8", "--global-batch-size", "8", "--max-steps", "2", "--log-every", "1", "--ckpt-every", "2",
    "--sample-every", "0", "--sample-steps", "2", "--samples-per-class", "1", "--eval-samples", "0", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_grid_single_pngs_and_npz_from_a_run_dir(toy_run, tmp_path, capsys):
    out, npz, singles = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "pngs"
    argv = ["--ckpt", str(toy_run), "--classes", "red circle, 7", "--per-class", "2", "--num-steps", "3"]
    assert sample.main([*argv, "--out", str(out), "--npz", str(npz), "--out-dir", str(singles)]) == 0
    assert out.is_file() and len(list(singles.glob("*.png"))) == 4
    data = np.load(npz)
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 7, 7]
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_images(toy_run, tmp_path):
    paths = [tmp_path / f"{i}.npz" for i in range(3)]
    for path, seed in zip(paths, ("1", "1", "2")):
        argv = ["--ckpt", str(toy_run), "--num-samples", "5", "--num-steps", "3", "--seed", seed]
        sample.main([*argv, "--npz", str(path)])
    a, b, c = (np.load(p) for p in paths)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    assert a["arr_0"].shape[0] == 5 and a["labels"].shape == (5,)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "red circel"], "unknown class 'red circel' (did you mean 'red circle'?)"),
        (["--classes", "12"], "class id 12 is out of range 0..9"),
        (["--guided-channels", "7"], "--guided-channels '7'"),
        (["--num-steps", "0"], "--num-steps must be in 1..1000"),
    ],
)
def test_bad_input_is_one_line(toy_run, tmp_path, extra, message, capsys):
    assert run_cli(sample.main, ["--ckpt", str(toy_run), "--out", str(tmp_path / "g.png"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_and_foreign_checkpoints_are_one_line(tmp_path, capsys):
    assert run_cli(sample.main, ["--ckpt", str(tmp_path / "nope.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    assert run_cli(sample.main, ["--ckpt", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_generate_cfg_scale_one_is_the_conditional_model(small_dit):
    labels = torch.tensor([1, 2, 3])
    a = sample.generate(small_dit, labels, cfg_scale=1.0, num_steps=4, seed=3)
    assert a.shape == (3, 4, 8, 8)
    b = sample.generate(small_dit, labels, cfg_scale=1.0, num_steps=4, seed=3, batch_size=2)
    c = sample.generate(small_dit, labels[:2], cfg_scale=1.0, num_steps=4, seed=3, batch_size=2)
    assert torch.equal(b[:2], c)  # chunk k is seeded with seed + k: chunks reproduce on their own
    g = sample.generate(small_dit, labels, cfg_scale=4.0, num_steps=4, seed=3)
    assert not torch.allclose(a, g)
    d = sample.generate(small_dit, labels, cfg_scale=4.0, num_steps=4, seed=3, sampler="ddim")
    assert torch.isfinite(d).all() and not torch.allclose(d, g)


def test_reference_layout_latent_model_decodes_with_the_vae(tiny_vae_dir, tmp_path):
    """A released-style bare state dict (latent model, 1000 classes) is sampled and decoded to pixels."""
    torch.manual_seed(0)
    model = perturbed(minidit.DiT_models["DiT-S/8"](input_size=8, num_classes=1000))
    ckpt = tmp_path / "DiT-S-8-64x64.pt"
    save_checkpoint(model.state_dict(), ckpt)
    npz = tmp_path / "s.npz"
    argv = ["--ckpt", str(ckpt), "--classes", "golden retriever,1", "--per-class", "1", "--num-steps", "2"]
    assert sample.main([*argv, "--vae", str(tiny_vae_dir), "--npz", str(npz), "--out", str(tmp_path / "g.png")]) == 0
    data = np.load(npz)
    assert data["arr_0"].shape == (2, 64, 64, 3)  # 8x8x4 latents -> 64x64 pixels
    assert data["labels"].tolist() == [207, 1]


def test_imagenet_names_come_from_torchvision():
    names = sample.imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[360] == "otter"
    assert sample.parse_classes("Golden Retriever, 88", names) == [207, 88]
    with pytest.raises(UserError, match="empty"):
        sample.parse_classes(" , ", names)
