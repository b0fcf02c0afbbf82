"""The trainer: configs, outputs, exact resume (also after SIGKILL), DDP on gloo, bad input."""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidit import config as C
from minidit import train
from minidit.checkpoint import read_file
from minidit.errors import UserError, run_cli
from minidit.rundir import RunWarning

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
        (["--model", "DiT-XL/3"], "unknown model 'DiT-XL/3' (did you mean 'DiT-XL/2' or 'DiT-XL/4'?)"),
        (["--model", "DiT-XL/9"], "(did you mean 'DiT-XL/8'?)"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--cfg-scale", "-inf"], "--cfg-scale must be a finite number"),
        (["--sample-classes", "0,99"], "--sample-classes 99: class ids must be in 0..9 (the data has 10 classes)"),
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
    expected = "error: unknown option --modle (did you mean --model?) (see `python -m minidit.train --help`)"
    assert out.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_field_with_a_description(capsys):
    assert train.main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for field in C.to_dict(C.TrainConfig()):
        line = next((x for x in lines if x.split()[:1] == [f"--{field.replace('_', '-')}"]), None)
        assert line is not None, field
        assert len(line.split()) >= 4, f"no description: {line!r}"  # flag, default, then words


def test_every_field_is_an_option_with_help_and_its_default():
    toy = C.to_dict(C.build_config("toy"))
    help_lines = C.help_text().splitlines()
    for f in dataclasses.fields(C.TrainConfig):
        flag, value = f"--{f.name.replace('_', '-')}", toy[f.name]
        text = "none" if value is None else value if isinstance(value, str) else json.dumps(value)  # true, 0.002
        shown = text or json.dumps(text)  # the empty string shows as ""
        line = next(x for x in help_lines if x.split()[:1] == [flag])
        assert f.metadata["help"] in line and line.endswith(f"(default: {shown})"), line
        # each option reads back what --help shows, and a value equal to the default is still a given one
        assert C.parse_overrides([f"{flag}={text}"]) == ("toy", {f.name: value}), flag
        assert C.parse_overrides([f"--{f.name}", text]) == ("toy", {f.name: value}), "underscores work too"


BOOL_WORDS = [(["true"], True), (["1"], True), (["Yes"], True), (["on"], True), ([], True), (["false"], False),
              (["0"], False), (["NO"], False), (["off"], False)]  # fmt: skip


@pytest.mark.parametrize("words,value", BOOL_WORDS)
def test_bool_options(words, value):
    assert C.parse_overrides(["--compile", *words, "--lr", "1"]) == ("toy", {"compile": value, "lr": 1.0})
    assert C.parse_overrides([f"--tf32={words[0]}" if words else "--tf32"]) == ("toy", {"tf32": value})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max_stpes", "3"], "unknown option --max-stpes (did you mean --max-steps?)"),
        (["--max", "3"], "unknown option --max (did you mean --max-steps?)"),  # no abbreviations
        (["--lr", "1", "--sample-clases=1"], "unknown option --sample-clases (did you mean --sample-classes?)"),
        (["--epochs", "3"], "unknown option --epochs (did you mean --max-steps?)"),
        (["--data_dir", "x"], "unknown option --data-dir (did you mean --data-path?)"),
    ],
)
def test_misspelled_options_get_a_suggestion(argv, message):
    with pytest.raises(UserError) as e:
        C.parse_overrides(argv)
    assert str(e.value).startswith(message), str(e.value)


def test_readme_shows_what_the_code_prints_for_a_model_typo():
    import re

    shown = re.search(r"`error: (unknown model 'DiT-XL/3' \(did you mean [^)]*\));", (ROOT / "README.md").read_text())
    assert shown, "README.md: the Training section's example of a bad model name"
    with pytest.raises(UserError) as e:
        C.build_config("toy", {"model": "DiT-XL/3"})
    assert str(e.value).startswith(shown.group(1))


def test_toy_class_count_matches_the_toy_data():
    from minidit import toy

    assert C.TOY_CLASSES == toy.NUM_CLASSES


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
    assert 0.9 < rows[0]["mse"] < 1.1  # a fresh DiT predicts eps ~ 0: the eps-MSE starts at E[eps^2] = 1
    assert all(r["vb"] > 0 for r in rows)  # the VB term (learned sigma) is logged, not zeros
    ckpt = final_state(run_dir)
    assert ckpt["step"] == 6 and ckpt["config"]["model"] == "DiT-Ti/8" and len(ckpt["class_names"]) == 10
    assert {"model", "ema", "opt", "rng", "data_position"} <= set(ckpt)
    # EMA differs from the model, and pos_embed is not averaged
    assert not torch.equal(ckpt["ema"]["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])
    summary = json.loads((run_dir / "summary.json").read_text())
    acc4, acc1 = summary["accuracy_cfg4"], summary["accuracy_cfg1"]
    assert all(10 * a == pytest.approx(round(10 * a)) for a in (acc4, acc1))  # fractions of the 10 samples
    assert f"(toy classifier, 10 EMA samples): {acc4:.1%} with CFG 4, {acc1:.1%} without" in out


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


# SIGKILL from inside the trainer at a fixed point of step 5 (checkpoints every step): every run is the same.
KILL_POINTS = {
    "in the forward pass": ("minidit.diffusion", "GaussianDiffusion", "training_losses"),
    "between the optimizer step and the EMA update": ("minidit.train", None, "update_ema"),
    "inside a checkpoint write": ("torch", None, "save"),
}
KILL_SCRIPT = """
import importlib, json, os, signal, sys
module, owner, name, nth, argv = sys.argv[1:6]
target = importlib.import_module(module)
target = getattr(target, owner) if owner != "None" else target
real, calls = getattr(target, name), []
def killer(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(nth):
        if name == "save":  # half a file where the checkpoint was being written
            with open(args[1], "wb") as fh:
                fh.write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(target, name, killer)
from minidit import train
sys.exit(train.main(json.loads(argv)))
"""


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_sigkill_then_resume_is_identical(tmp_path, where):
    argv = [*TINY, "--max-steps", "8", "--ckpt-every", "1"]
    full = run_train(tmp_path, "--max-steps", "8", "--ckpt-every", "1", name="full")
    run_dir = tmp_path / "killed"
    module, owner, name = KILL_POINTS[where]
    out = cli("-c", KILL_SCRIPT, module, str(owner), name, "5", json.dumps([*argv, "--run-dir", str(run_dir)]),
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert read_file(run_dir / "checkpoints" / "last.pt")["step"] == 4  # killed during step 5
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


def test_train_on_an_image_folder(tmp_path, capsys):
    from conftest import make_folder

    data = make_folder(tmp_path / "imgs", counts=(5, 5, 6), size=40)
    run_dir = run_train(tmp_path, "--data", "folder", "--data-path", str(data), "--max-steps", "2", "--log-every", "1")
    assert "data: 16 images in 3 classes (c0: 5, c1: 5, c2: 6)" in capsys.readouterr().out
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


def test_sample_classes_outside_the_data_fail_before_training(tmp_path):
    from conftest import make_folder

    data = make_folder(tmp_path / "imgs", counts=(2, 2, 2), size=40)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"--sample-classes 5: class ids must be in 0..2 \(the data has 3 classes\)"):
        train.main([*TINY, "--data", "folder", "--data-path", str(data), "--sample-classes", "0,5",
                    "--run-dir", str(run_dir)])  # fmt: skip
    assert not (run_dir / "log.jsonl").exists() and not (run_dir / "checkpoints" / "last.pt").exists()


# --------------------------------------------------------------------------
# Run directories: one writer, damaged files, nothing but finite weights
# --------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from minidit import rundir
rundir.lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_trainer_is_refused_naming_the_pid_and_a_sigkill_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"{run_dir} is in use by another training process \(pid {holder.pid}\)"):
            train.main([*TINY, "--run-dir", str(run_dir)])
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing read, cleaned or written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from minidit import rundir

    rundir.unlock(rundir.lock(run_dir))  # the kill released it: no stale lock


def test_weights_with_nan_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    """The loss guard cannot see the EMA (or a step that breaks the weights just before a save)."""
    real, calls = train.update_ema, []

    def update_ema(ema, model, decay):
        real(ema, model, decay)
        calls.append(1)
        if len(calls) == 5:  # the 5th step: after the checkpoint at step 3, before the one at step 6
            next(ema.parameters()).data[0] = float("inf")

    monkeypatch.setattr(train, "update_ema", update_ema)
    run_dir = tmp_path / "run"
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 3
    out = capsys.readouterr().out
    assert "error: the weights (EMA) became NaN/inf at step 6; stopped." in out and "(step 3)" in out
    ckpt = final_state(run_dir)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def test_resume_without_config_json_checks_the_checkpoints_config(tmp_path):
    run_dir = run_train(tmp_path, "--max-steps", "3")
    (run_dir / "config.json").unlink()
    with pytest.raises(UserError, match=r"belongs to a different config \(lr: 0.002 there, 0.01 here\)"):
        train.main([*TINY, "--run-dir", str(run_dir), "--lr", "0.01"])
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0  # the same settings resume
    assert final_state(run_dir)["step"] == 6


@pytest.mark.parametrize("text", ['{"config": {"mod', "[1, 2]"])
def test_a_damaged_config_json_is_one_line(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    with pytest.raises(UserError, match=r"config.json: .*; move the run directory aside or pass --run-dir$") as e:
        train.main([*TINY, "--run-dir", str(tmp_path / "run")])
    assert "\n" not in str(e.value)


def damage(ckpt: dict, how: str) -> None:
    if how == "no rng":
        del ckpt["rng"]
    elif how == "bad step":
        ckpt["step"] = "three"
    elif how == "negative step":
        ckpt["step"] = -3
    elif how == "optimizer shapes":
        ckpt["opt"]["state"][0]["exp_avg"] = torch.zeros(3)
    elif how == "optimizer groups":
        ckpt["opt"]["param_groups"][0]["params"] = ckpt["opt"]["param_groups"][0]["params"][:-1]
    elif how == "bad schedule":
        ckpt["config"]["noise_schedule"] = "quadratic"
    elif how == "bad step count":
        ckpt["config"]["diffusion_steps"] = "many"
    elif how == "no config":
        ckpt["config"] = None


DAMAGES = ["no rng", "bad step", "negative step", "optimizer shapes", "optimizer groups", "bad schedule",
           "bad step count", "no config"]  # fmt: skip


def test_damaged_checkpoints_are_one_line_and_kept(tmp_path, capsys):
    from minidit.checkpoint import save_checkpoint

    run_dir = run_train(tmp_path, "--max-steps", "3")
    path = run_dir / "checkpoints" / "last.pt"
    good = read_file(path)
    capsys.readouterr()
    for how in DAMAGES:
        ckpt = copy.deepcopy(good)
        damage(ckpt, how)
        save_checkpoint(ckpt, path)
        before = path.read_bytes()
        assert run_cli(train.main, [*TINY, "--run-dir", str(run_dir)]) == 2, how
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0], (how, err)
        assert "cannot resume" in err[0] or "saved config is invalid" in err[0] or "no training config" in err[0]
        assert path.read_bytes() == before, how  # never costs the checkpoint


def test_torn_last_log_line_is_dropped_with_a_warning(tmp_path):
    run_dir = run_train(tmp_path, "--max-steps", "3")
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.9')  # a crash or a full disk in the middle of an append
    with pytest.warns(RunWarning, match="log.jsonl: dropped its torn last line"):
        assert run_cli(train.main, [*TINY, "--run-dir", str(run_dir)]) == 0
    assert [json.loads(r)["step"] for r in (run_dir / "log.jsonl").read_text().splitlines()] == [2, 3, 4, 6]


def test_corrupt_summary_is_written_again(tmp_path):
    run_dir = run_train(tmp_path)
    (run_dir / "summary.json").write_text('{"step": 6, "gri')
    with pytest.warns(RunWarning, match="summary.json: unreadable; it is written again"):
        assert run_cli(train.main, [*TINY, "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_cli(train.main, [*TINY, "--run-dir", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write the run directory {afile} (a file is in the way: it is not a directory); "
                   "pass --run-dir with a writable directory"]  # fmt: skip


@pytest.mark.parametrize("where", ["run", "checkpoints"])
def test_unwritable_run_dir_fails_before_training(where, tmp_path, monkeypatch):
    """Root ignores permissions (chmod proves nothing then), so the refusal is simulated where files are
    created; the point is that it is found at start-up, not at the first checkpoint."""
    import tempfile

    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if Path(dir).name == where:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=rf"cannot write the run directory {run_dir}.*\(Permission denied\)"):
        train.main([*TINY, "--run-dir", str(run_dir)])
    assert not (run_dir / "log.jsonl").exists()


def test_no_label_dropout_trains_and_samples_without_guidance(tmp_path, capsys):
    run_dir = run_train(tmp_path, "--class-dropout-prob", "0", "--eval-samples", "10")
    out = capsys.readouterr().out
    assert "drawn without guidance" in out
    assert (run_dir / "samples" / "final.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "accuracy_cfg1" in summary and "accuracy_cfg4" not in summary


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_device_mps_without_one_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--device mps: this machine has no Apple GPU \(MPS\)"):
        train.main([*TINY, "--run-dir", str(tmp_path / "run"), "--device", "mps"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_one_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is visible here"):
        train.main([*TINY, "--run-dir", str(tmp_path / "run"), "--device", "cuda"])


# --------------------------------------------------------------------------
# Test isolation (tests/conftest.py)
# --------------------------------------------------------------------------


def test_tests_run_in_their_own_empty_directory(tmp_path):
    assert Path.cwd() == tmp_path and Path.cwd() != ROOT


def test_the_guard_sees_any_change_in_a_guarded_folder(tmp_path):
    from conftest import snapshot

    roots = (tmp_path / "runs", tmp_path / "data")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    before = snapshot(roots)
    assert snapshot(roots) == before
    (tmp_path / "data" / "cifar10" / "x").write_text("x")
    after = snapshot(roots)
    assert after != before
    (tmp_path / "runs" / "toy").mkdir(parents=True)
    assert snapshot(roots) != after


# --------------------------------------------------------------------------
# Label drops and flips, seen from inside a real run
# --------------------------------------------------------------------------


def test_training_drops_ten_percent_of_labels_to_the_null_class_and_flips_half_the_images(tmp_path, monkeypatch):
    """Through the trainer's own path (folder data, pixel flips): the labels the model actually embeds and the
    images ``training_losses`` receives, over 16 steps x 64 images. Deterministic (seeded); the windows are
    about 3 standard deviations wide, so a drop rate of 0 or 1, a wrong null index, no flips or only flips fail."""
    import numpy as np
    from conftest import save_image

    classes, per_class, size = 3, 4, 16
    for c in range(classes):
        for i in range(per_class):
            arr = np.zeros((size, size, 3), dtype=np.uint8)
            arr[:, size // 2 :] = 255  # dark left half, bright right half: a flipped image is bright on the left
            arr[0, 0] = 10 * (per_class * c + i)  # distinct files
            save_image(tmp_path / "imgs" / f"c{c}" / f"{i}.png", arr)

    embedded, seen_y, seen_x = [], [], []

    def record_embedding(module, args):
        if isinstance(module, torch.nn.Embedding) and module.training:
            embedded.append(args[0].detach().clone())

    real = train.create_diffusion

    def recording(*args, **kwargs):
        d = real(*args, **kwargs)
        losses = d.training_losses

        def training_losses(model, x_start, t, model_kwargs=None, noise=None):
            seen_y.append(model_kwargs["y"].detach().clone())
            seen_x.append(x_start.detach().clone())
            return losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)

        d.training_losses = training_losses
        return d

    monkeypatch.setattr(train, "create_diffusion", recording)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_embedding)
    try:
        run_train(
            tmp_path, "--data", "folder", "--data-path", str(tmp_path / "imgs"), "--image-size", str(size),
            "--global-batch-size", "64", "--max-steps", "16", "--ckpt-every", "16", "--log-every", "16",
            "--num-workers", "0", "--hflip", "true",  # flips are off by default for folders; the drop rate is not
        )  # fmt: skip
    finally:
        handle.remove()

    y, got = torch.cat(seen_y), torch.cat(embedded)
    assert len(y) == len(got) == 16 * 64
    dropped = got != y
    assert torch.all(got[dropped] == classes), "a dropped label must become the null class (index num_classes)"
    assert 0.07 <= dropped.float().mean().item() <= 0.13  # class_dropout_prob 0.1
    x = torch.cat(seen_x)  # [N, 3, 16, 16] in [-1, 1]
    flipped = x[..., : size // 2].mean(dim=(1, 2, 3)) > x[..., size // 2 :].mean(dim=(1, 2, 3))
    assert 0.44 <= flipped.float().mean().item() <= 0.56  # horizontal flips with probability 0.5
    for preset in ("cifar10", "imagenet256-xl2"):  # the reference recipe: both on by default
        cfg = C.build_config(preset)
        assert cfg.class_dropout_prob == 0.1 and cfg.hflip, preset


def test_output_piped_into_head_is_not_a_traceback(tmp_path):
    """`python -m minidit.X ... | head -1`: the reader closes the pipe before the CLI is done writing (here 1 MB,
    more than a pipe holds): run_cli ends quietly, no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    write = "lambda a: print('x' * 99 + chr(10)) or print('y' * 1_000_000)"
    script = f"import sys; from minidit.errors import run_cli; sys.exit(run_cli({write}))"
    cmd = f'{sys.executable} -c "{script}" | head -1'
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.stdout.startswith("x") and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
