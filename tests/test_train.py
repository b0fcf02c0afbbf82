"""The trainer: configs, outputs, exact resume (also after SIGKILL), DDP on gloo, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidit import config as C
from minidit import train
from minidit.checkpoint import read_file
from minidit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]

# A few seconds per run on 2 CPU cores: 16 tokens, batch 8.
TINY = [
    "--model", "DiT-Ti/8", "--global-batch-size", "8", "--max-steps", "6", "--log-every", "2",
    "--ckpt-every", "3", "--sample-every", "0", "--sample-steps", "4", "--samples-per-class", "1",
    "--eval-samples", "0", "--warmup-steps", "2", "--device", "cpu",
]  # fmt: skip


def run_train(tmp_path: Path, *extra: str, name: str = "run") -> Path:
    run_dir = tmp_path / name
    assert train.main([*TINY, "--run-dir", str(run_dir), *extra]) == 0
    return run_dir


def final_state(run_dir: Path) -> dict:
    return read_file(run_dir / "checkpoints" / "last.pt")


def assert_same_weights(a: dict, b: dict, exact: bool = True):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                # fp32 sums in another order differ in the last bits; Adam turns a near-zero gradient's
                # rounding into a step of up to +-lr, so a handful of weights may differ by ~lr/30.
                diff = (a[part][k] - b[part][k]).abs().max().item()
                assert diff <= 1e-4, f"{part}.{k} differs by {diff:.3g}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def test_presets_are_valid_and_overridable():
    for name in C.PRESETS:
        C.build_config(name, {"data_path": "x"} if name.startswith("imagenet") else None)
    preset, over = C.parse_overrides(["--config", "cifar10", "--lr=3e-4", "--compile", "--max-steps", "4e5"])
    assert preset == "cifar10" and over == {"lr": 3e-4, "compile": True, "max_steps": 400_000}
    cfg = C.build_config(preset, over)
    assert cfg.model == "DiT-S/2" and cfg.lr == 3e-4 and cfg.global_batch_size == 128
    xl = C.build_config("imagenet256-xl2")
    recipe = (xl.model, xl.global_batch_size, xl.lr, xl.ema_decay, xl.weight_decay)
    assert recipe == ("DiT-XL/2", 256, 1e-4, 0.9999, 0.0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lerning-rate", "1"], "unknown option --lerning-rate"),
        (["--learning-rate", "1"], "unknown option --learning-rate (did you mean --lr?)"),
        (["--batch-size", "8"], "(did you mean --global-batch-size?)"),
        (["--lr", "fast"], "--lr: expected float"),
        (["--max-steps", "1.5"], "--max-steps: expected int"),
        (["--compile", "maybe"], "--compile: expected bool"),
        (["--config", "cifar"], "did you mean 'cifar10'"),
        (["--model", "DiT-XL/3"], "unknown model 'DiT-XL/3' (did you mean"),
        (["--image-size", "30"], "--image-size 30 is not divisible by the patch size 4 of DiT-Ti/4"),
        (["--config", "imagenet256-xl2", "--image-size", "200"], "not divisible by patch size 2 x VAE factor 8 = 16"),
        (["--data", "folder"], "--data folder needs --data-path"),
        (["--precision", "fp8"], "choose one of auto, fp32, bf16, fp16"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "not divisible by micro batch 4"),
        (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_options_fail_before_any_work(argv, message, tmp_path):
    with pytest.raises(UserError, match=None) as e:
        preset, over = C.parse_overrides(argv)
        cfg = C.build_config(preset, over)
        C.batch_layout(cfg, 1)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    out = cli("-m", "minidit.train", "--modle", "DiT-S/2", cwd=tmp_path)
    assert out.returncode == 2
    expected = "error: unknown option --modle (did you mean --model?); see --help for the list"
    assert out.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_field(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"--{f.replace('_', '-')}" in text for f in C.to_dict(C.TrainConfig()))


# --------------------------------------------------------------------------
# A run and its outputs
# --------------------------------------------------------------------------


def test_toy_run_writes_everything(tmp_path, capsys):
    run_dir = run_train(tmp_path, "--eval-samples", "10")
    out = capsys.readouterr().out
    for name in ("config.json", "log.jsonl", "loss.png", "summary.json", "samples/final.png", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
        assert str(run_dir / name) in out or name in ("config.json", "summary.json")
    rows = [json.loads(r) for r in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["loss"] > 0 and abs(r["loss"] - r["mse"] - r["vb"]) < 1e-4 for r in rows)
    ckpt = final_state(run_dir)
    assert ckpt["step"] == 6 and ckpt["config"]["model"] == "DiT-Ti/8" and len(ckpt["class_names"]) == 10
    assert {"model", "ema", "opt", "rng", "data_position"} <= set(ckpt)
    # EMA differs from the model, and pos_embed is not averaged
    assert not torch.equal(ckpt["ema"]["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["accuracy_cfg4"] <= 1 and "sample accuracy" in out


def test_finished_run_is_not_retrained_and_other_config_is_refused(tmp_path, capsys):
    run_dir = run_train(tmp_path)
    before = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0
    assert "already finished 6 steps" in capsys.readouterr().out
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"belongs to a different config \(lr: 0.002 there, 0.01 here\)"):
        train.main([*TINY, "--run-dir", str(run_dir), "--lr", "0.01"])


def test_resume_is_bit_exact(tmp_path):
    full = run_train(tmp_path, name="full")
    part = run_train(tmp_path, "--max-steps", "3", name="part")
    assert final_state(part)["step"] == 3
    assert train.main([*TINY, "--run-dir", str(part)]) == 0  # --max-steps 6 again: continues
    assert_same_weights(final_state(full), final_state(part))
    a, b = final_state(full)["opt"]["state"], final_state(part)["opt"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    rows = [json.loads(r)["step"] for r in (part / "log.jsonl").read_text().splitlines()]
    assert rows == [2, 3, 4, 6]  # 3: the end of the first run; nothing logged twice


def test_sigkill_at_a_random_moment_then_resume_is_identical(tmp_path):
    argv = [*TINY, "--max-steps", "80", "--ckpt-every", "1"]
    full = run_train(tmp_path, "--max-steps", "80", "--ckpt-every", "1", name="full")
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minidit.train", *argv, "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.05, 0.5))  # an arbitrary moment: inside a step, or inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_file(ckpt)["step"]
    assert killed_at < 80, "the run finished before the kill; the test proves nothing"
    assert train.main([*argv, "--run-dir", str(run_dir)]) == 0
    assert_same_weights(final_state(full), final_state(run_dir))
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "stale temporary files were not cleaned up"


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    script = f"""
import os, signal, sys, torch
import minidit.checkpoint as ck
calls = []
real_save = torch.save
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write half a file, then die
        with open(f, "wb") as fh:
            fh.write(b"PK\\x03\\x04 half a checkpoint")
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
from minidit import train
sys.exit(train.main({[*TINY, "--run-dir", str(run_dir)]!r}))
"""
    out = cli("-c", script, cwd=tmp_path)
    assert out.returncode == -signal.SIGKILL
    ckpt = read_file(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3  # the first checkpoint survived the kill during the second write


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.create_diffusion

    def poisoned(*args, **kwargs):
        d = real(*args, **kwargs)
        losses, calls = d.training_losses, []

        def training_losses(*a, **k):
            calls.append(1)
            out = losses(*a, **k)
            if len(calls) >= 5:  # step index 4 (0-based), after the checkpoint at step 3
                out = {key: v * float("nan") for key, v in out.items()}
            return out

        d.training_losses = training_losses
        return d

    monkeypatch.setattr(train, "create_diffusion", poisoned)
    run_dir = tmp_path / "run"
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 3
    out = capsys.readouterr().out
    assert "the loss became NaN/inf at step 4" in out and "(step 3)" in out
    ckpt = final_state(run_dir)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("how", ["oserror", "torch"])
def test_disk_full_while_saving_is_one_line_and_keeps_the_checkpoint(how, tmp_path, monkeypatch):
    """A full disk during the second checkpoint write. ``torch.save`` writes from C++: on a real full disk
    it raises RuntimeError("... unexpected pos ..."), not OSError(ENOSPC); both must be recognised."""
    import errno
    import shutil

    run_dir = tmp_path / "run"
    real_save, real_usage, calls = torch.save, shutil.disk_usage, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2 and how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19092288 vs 19092180")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match="no space left on device.*previous checkpoint is intact"):
        train.main([*TINY, "--run-dir", str(run_dir)])
    assert read_file(run_dir / "checkpoints" / "last.pt")["step"] == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_other_save_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def save(obj, f, *a, **k):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RuntimeError, match="some other failure"):
        train.main([*TINY, "--run-dir", str(tmp_path / "run")])


def test_corrupt_checkpoint_in_run_dir_is_one_line(tmp_path):
    run_dir = run_train(tmp_path, "--max-steps", "3")
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code = run_cli(train.main, [*TINY, "--run-dir", str(run_dir)])
    assert code == 2


# --------------------------------------------------------------------------
# Batches: accumulation and DDP on gloo
# --------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = run_train(tmp_path, "--max-steps", "3", name="big")
    acc = run_train(tmp_path, "--max-steps", "3", "--micro-batch-size", "2", name="acc")
    assert_same_weights(final_state(big), final_state(acc), exact=False)


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    one = run_train(tmp_path, "--max-steps", "3", name="one")
    two = tmp_path / "two"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    out = cli(*launcher, "-m", "minidit.train", *TINY, "--max-steps", "3", "--run-dir", str(two), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es), batch 8 = 2 x 4 x 1" in out.stdout
    assert_same_weights(final_state(one), final_state(two), exact=False)
    rows_one = [json.loads(r) for r in (one / "log.jsonl").read_text().splitlines()]
    rows_two = [json.loads(r) for r in (two / "log.jsonl").read_text().splitlines()]
    # the logged loss is all-reduced over both processes: it equals the 1-process loss
    assert rows_one[0]["loss"] == pytest.approx(rows_two[0]["loss"], rel=1e-4)


# --------------------------------------------------------------------------
# Real datasets: an image folder and VAE latents
# --------------------------------------------------------------------------


def test_train_on_an_image_folder(tmp_path):
    from conftest import make_folder

    data = make_folder(tmp_path / "imgs", counts=(5, 5, 6), size=40)
    run_dir = run_train(tmp_path, "--data", "folder", "--data-path", str(data), "--max-steps", "2", "--log-every", "1")
    ckpt = final_state(run_dir)
    assert ckpt["class_names"] == ["c0", "c1", "c2"]
    assert ckpt["model"]["y_embedder.embedding_table.weight"].shape[0] == 4  # 3 classes + null


def test_train_on_extracted_latents(tmp_path, tiny_vae_dir):
    from conftest import make_folder

    from minidit import extract_latents

    data = make_folder(tmp_path / "imgs", counts=(4, 4), size=64)
    latents = tmp_path / "latents"
    argv = ["--data-path", str(data), "--out", str(latents), "--image-size", "64", "--vae", str(tiny_vae_dir)]
    assert extract_latents.main([*argv, "--shard-size", "4", "--flip", "--num-workers", "0", "--device", "cpu"]) == 0
    run_dir = run_train(
        tmp_path, "--data", "latents", "--data-path", str(latents), "--image-size", "64", "--model", "DiT-Ti/2",
        "--max-steps", "2", "--log-every", "1", "--vae", str(tiny_vae_dir),
    )  # fmt: skip
    ckpt = final_state(run_dir)
    assert ckpt["model"]["x_embedder.proj.weight"].shape == (128, 4, 2, 2)  # 4 latent channels
    assert (run_dir / "samples" / "final.png").is_file()  # decoded by the VAE


def test_missing_data_dir_is_one_line(tmp_path, capsys):
    code = run_cli(train.main, [*TINY, "--data", "folder", "--data-path", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_disk_full_while_logging_is_one_line(tmp_path, monkeypatch):
    import errno

    def write_log(self, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.log_path))

    monkeypatch.setattr(train.Trainer, "write_log", write_log)
    with pytest.raises(UserError, match=r"no space left on device \(.*log.jsonl\); checkpoints are intact"):
        train.main([*TINY, "--run-dir", str(tmp_path / "run")])
