"""python -m minidit.sample: grids, single PNGs, the ADM .npz, class names, latent models with a VAE;
noise seeded per sample, shards that survive a crash, one line for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturbed

import minidit
from minidit import sample, toy, train
from minidit.checkpoint import save_checkpoint
from minidit.errors import UserError, run_cli
from minidit.model import create_model

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--model", "DiT-Ti/8", "--global-batch-size", "8", "--max-steps", "2", "--log-every", "1", "--ckpt-every", "2",
    "--sample-every", "0", "--sample-steps", "2", "--samples-per-class", "1", "--eval-samples", "0", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def make_run(run_dir: Path, class_dropout_prob: float = 0.1, nan: bool = False) -> Path:
    """A run directory as the trainer leaves it, without training: a perturbed DiT-Ti/8 on 16 px toy images."""
    torch.manual_seed(0)
    model = create_model(
        "DiT-Ti/8", input_size=16, in_channels=3, num_classes=10, class_dropout_prob=class_dropout_prob
    )
    sd = perturbed(model).state_dict()
    if nan:
        sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    config = {"model": "DiT-Ti/8", "data": "toy", "image_size": 16, "class_dropout_prob": class_dropout_prob,
              "learn_sigma": True, "noise_schedule": "cosine", "diffusion_steps": 1000}  # fmt: skip
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": config, "preset": "toy"}))
    state = {"version": 1, "model": sd, "ema": sd, "step": 1, "config": config, "class_names": toy.CLASS_NAMES}
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("made") / "run")


FAST = ["--num-steps", "2", "--device", "cpu"]


def test_grid_single_pngs_and_npz_from_a_run_dir(toy_run, tmp_path, capsys):
    out, npz, singles = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "pngs"
    argv = ["--ckpt", str(toy_run), "--classes", "red circle, 7", "--per-class", "2", "--num-steps", "3"]
    assert sample.main([*argv, "--out", str(out), "--npz", str(npz), "--out-dir", str(singles)]) == 0
    assert out.is_file() and len(list(singles.glob("*.png"))) == 4
    data = np.load(npz)
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 7, 7]
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_images(run, tmp_path):
    paths = [tmp_path / f"{i}.npz" for i in range(3)]
    for path, seed in zip(paths, ("1", "1", "2")):
        assert sample.main(["--ckpt", str(run), "--num-samples", "5", *FAST, "--seed", seed, "--npz", str(path)]) == 0
    a, b, c = (np.load(p) for p in paths)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    assert a["arr_0"].shape == (5, 16, 16, 3) and a["labels"].shape == (5,)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "red circel"], "unknown class 'red circel' (did you mean 'red circle'?)"),
        (["--classes", "12"], "class id 12 is out of range 0..9"),
        (["--guided-channels", "7"], "--guided-channels '7'"),
        (["--num-steps", "0"], "argument --num-steps: must be at least 1, got 0"),
        (["--num-steps", "1001"], "--num-steps 1001: must be in 2..1000 (the model's diffusion steps)"),
        (["--num-steps", "1"], "--num-steps 1: must be in 2..1000"),
        (["--num-samples", "-5"], "argument --num-samples: must be at least 1, got -5"),
        (["--cfg-scale", "-3"], "--cfg-scale -3.0: the guidance scale must be a finite number >= 0"),
        (["--cfg-scale", "nan"], "--cfg-scale nan: the guidance scale must be a finite number >= 0"),
        (["--cfg-sacle", "4"], "unknown option --cfg-sacle (did you mean --cfg-scale?)"),
        (["--num-samples", "8"], "--out is the class grid, which --num-samples does not make: use --npz"),
        (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda, cuda:N or mps"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: no CUDA GPU is visible here (use --device cpu)",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here"),
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_line(run, tmp_path, extra, message, capsys):
    assert run_cli(sample.main, ["--ckpt", str(run), "--out", str(tmp_path / "g.png"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sampling steps, respaced (default: 250)" in text
    assert "--sampler {ddpm,ddim,euler,heun} flow runs: euler or heun (default: ddpm; flow runs: euler)" in text


def test_outputs_go_under_the_run_dir_by_default(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r")
    assert sample.main(["--ckpt", str(run_dir), "--classes", "0", "--per-class", "1", *FAST]) == 0
    grid = run_dir / "samples" / "grid_cfg4_ddpm2_seed0.png"
    assert grid.is_file() and capsys.readouterr().out.strip() == f"wrote {grid}"
    assert sample.main(["--ckpt", str(run_dir), "--num-samples", "2", *FAST]) == 0
    assert (run_dir / "samples" / "2_cfg4_ddpm2_seed0.npz").is_file()
    # a checkpoint that is not a run has no run dir: it must say where
    weights = tmp_path / "w.safetensors"
    save_checkpoint(sample.load_for_sampling(str(run_dir))[0].state_dict(), weights)
    for argv, flag in ((["--classes", "0"], "--out FILE.png"), (["--num-samples", "2"], "--npz FILE")):
        assert run_cli(sample.main, ["--ckpt", str(weights), *argv, *FAST]) == 2
        err = capsys.readouterr().err
        assert "is not a minidit run: say where the" in err and flag in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "w.safetensors"]


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", nan=True)
    assert run_cli(sample.main, ["--ckpt", str(run_dir), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights hold NaN/inf (blocks.0.attn.qkv.weight)" in err[0], err
    assert not (run_dir / "samples").exists()


def test_non_finite_samples_are_an_error(small_dit):
    with pytest.raises(UserError, match=r"samples 0\.\.1 hold NaN/inf"):
        sample.generate(small_dit, torch.tensor([1, 2]), num_steps=2, decoder=lambda x: x * float("nan"))


def test_a_model_without_null_class_samples_without_guidance_only(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", class_dropout_prob=0.0)
    model, _ = sample.load_for_sampling(str(run_dir))
    assert model.num_classes == 10  # (inferred from shapes it was 9, and class 9 was taken for the null label)
    assert run_cli(sample.main, ["--ckpt", str(run_dir), "--classes", "9", *FAST]) == 2
    assert "no null class and classifier-free guidance is impossible; use --cfg-scale 1" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(run_dir), "--classes", "9", "--cfg-scale", "1", *FAST]) == 0


def test_a_sample_does_not_depend_on_its_batch(small_dit):
    labels = torch.tensor([1, 2, 3, 4, 5])
    for cfg in (1.0, 4.0):
        one = sample.generate(small_dit, labels, cfg_scale=cfg, num_steps=3, seed=7, batch_size=5)
        apart = sample.generate(small_dit, labels, cfg_scale=cfg, num_steps=3, seed=7, batch_size=2)
        torch.testing.assert_close(one, apart, atol=1e-4, rtol=1e-5)  # batched matmuls round differently
        last = sample.generate(small_dit, labels[3:], cfg_scale=cfg, num_steps=3, seed=7, indices=torch.arange(3, 5))
        torch.testing.assert_close(one[3:], last, atol=1e-4, rtol=1e-5)


def test_interrupted_sampling_continues_from_its_shards(run, tmp_path, monkeypatch, capsys):
    argv = ["--ckpt", str(run), "--num-samples", "7", "--batch-size", "2", *FAST]
    assert sample.main([*argv, "--npz", str(tmp_path / "whole.npz")]) == 0
    npz, shards = tmp_path / "s.npz", tmp_path / "s.npz.shards"
    real, calls = sample.generate, []

    def counting(*args, fail_at=None, **kwargs):
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(kwargs["indices"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", lambda *a, **k: counting(*a, fail_at=2, **k))
    assert run_cli(sample.main, [*argv, "--npz", str(npz)]) == 130  # killed during the third batch
    assert sorted(p.name for p in shards.glob("0*.npz")) == ["00000000.npz", "00000002.npz"] and not npz.exists()
    capsys.readouterr()

    assert run_cli(sample.main, [*argv, "--npz", str(npz), "--cfg-scale", "2"]) == 2  # other settings: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds samples made with other settings (cfg_scale: 4.0 there, 2.0 here)" in err[0], err

    calls.clear()
    monkeypatch.setattr(sample, "generate", counting)
    assert sample.main([*argv, "--npz", str(npz), "--out-dir", str(tmp_path / "pngs")]) == 0
    assert calls == [[4, 5], [6]]  # only the missing shards
    assert "4 already there, 3 to go" in capsys.readouterr().out
    merged, whole = np.load(npz), np.load(tmp_path / "whole.npz")
    assert merged["arr_0"].shape == (7, 16, 16, 3) and merged["arr_0"].dtype == np.uint8
    assert np.array_equal(merged["arr_0"], whole["arr_0"]) and np.array_equal(merged["labels"], whole["labels"])
    assert not shards.exists() and len(list((tmp_path / "pngs").glob("*.png"))) == 7


def test_one_and_two_processes_write_the_same_samples(run, tmp_path):
    """torchrun with 2 gloo processes on the CPU: process r draws batches r, r + 2, ...; the images are those
    of one process, sample for sample."""
    argv = ["--ckpt", str(run), "--num-samples", "5", "--batch-size", "2", *FAST]
    assert sample.main([*argv, "--npz", str(tmp_path / "one.npz")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    done = subprocess.run(
        [*cmd, "minidit.sample", *argv, "--npz", str(tmp_path / "two.npz")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2 process(es))" in done.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])


def test_python_m_minidit_sample_bad_checkpoints_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for ckpt, message in ((tmp_path / "empty", "neither a minidit run directory"), ("nope.pt", "no such checkpoint")):
        done = subprocess.run(
            [sys.executable, "-m", "minidit.sample", "--ckpt", str(ckpt), "--out", "g.png"],
            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_missing_and_foreign_checkpoints_are_one_line(tmp_path, capsys):
    assert run_cli(sample.main, ["--ckpt", str(tmp_path / "nope.pt"), "--out", "g.png"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    assert run_cli(sample.main, ["--ckpt", str(bad), "--out", "g.png"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_generate_cfg_scale_one_is_the_conditional_model(small_dit):
    labels = torch.tensor([1, 2, 3])
    a = sample.generate(small_dit, labels, cfg_scale=1.0, num_steps=4, seed=3)
    assert a.shape == (3, 4, 8, 8)
    b = sample.generate(small_dit, labels, cfg_scale=1.0, num_steps=4, seed=3, batch_size=2)
    c = sample.generate(small_dit, labels[:2], cfg_scale=1.0, num_steps=4, seed=3, batch_size=2)
    assert torch.equal(b[:2], c)  # sample i's noise is seeded by (seed, i)
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


def test_sampling_on_a_busy_cpu_uses_one_thread(tmp_path, monkeypatch, capsys):
    """Like the trainer: with the load average above the cores, torch's default threads would fight the other
    processes (1.8 s instead of 65 ms a step, measured), so the sampler takes one thread (silently: its errors
    stay one line)."""
    import os

    from minidit import sample, toy

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sample.main(["--ckpt", str(toy.DEFAULT_DIT), "--classes", "0", "--num-steps", "2",
                     "--out", str(tmp_path / "g.png")])  # fmt: skip
        assert torch.get_num_threads() == 1 and (tmp_path / "g.png").is_file()
    finally:
        torch.set_num_threads(saved)
