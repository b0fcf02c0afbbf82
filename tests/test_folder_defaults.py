"""``--data folder`` defaults (issue 9): applied under the default config, printed at start-up, options win."""

import pytest
import torch

from minidit import config as C
from minidit import train


def folder_config(*extra: str) -> tuple[C.TrainConfig, dict]:
    preset, overrides = C.parse_overrides(["--data", "folder", "--data-path", "imgs", *extra])
    return C.build_config(preset, overrides), C.folder_defaults(preset, overrides)


def test_folder_defaults_are_applied():
    cfg, applied = folder_config()
    assert cfg.model == "DiT-Ti/2" and cfg.image_size == 16  # 64 tokens
    assert (cfg.noise_schedule, cfg.lr, cfg.ema_decay, cfg.max_steps) == ("cosine", 2e-3, 0.995, 3000)
    assert cfg.hflip is False and cfg.eval_samples == 0
    assert set(applied) == {"image_size", "model", *C.FOLDER_DEFAULTS}


def test_given_options_win_over_folder_defaults():
    cfg, applied = folder_config("--lr", "3e-4", "--model", "DiT-Ti/4", "--hflip", "true", "--max-steps", "50")
    assert (cfg.lr, cfg.model, cfg.hflip, cfg.max_steps) == (3e-4, "DiT-Ti/4", True, 50)
    assert not {"lr", "model", "hflip", "max_steps"} & set(applied)
    assert cfg.eval_samples == 0 and applied["noise_schedule"] == "cosine"  # the others still apply


def test_options_equal_to_a_default_still_win_over_folder_defaults():
    given = ("--model", "DiT-Ti/4", "--max-steps", "6000", "--hflip", "true", "--warmup-steps", "0")
    cfg, applied = folder_config(*given)  # DiT-Ti/4, 6000: the toy preset's; hflip, warmup 0: TrainConfig's
    assert (cfg.model, cfg.max_steps, cfg.hflip, cfg.warmup_steps) == ("DiT-Ti/4", 6000, True, 0)
    assert not {"model", "max_steps", "hflip", "warmup_steps"} & set(applied)
    assert applied["eval_samples"] == cfg.eval_samples == 0  # the others still apply


@pytest.mark.parametrize("size, model", [(16, "DiT-Ti/2"), (32, "DiT-Ti/4"), (64, "DiT-Ti/8"), (24, "DiT-Ti/4")])
def test_patch_size_follows_the_image_size(size, model):
    cfg, applied = folder_config("--image-size", str(size))
    assert cfg.model == model and "image_size" not in applied


@pytest.mark.parametrize("argv", [["--data", "toy"], ["--config", "cifar10", "--data", "folder", "--data-path", "x"]])
def test_folder_defaults_only_for_folders_under_the_default_config(argv):
    preset, overrides = C.parse_overrides(argv)
    assert C.folder_defaults(preset, overrides) == {}
    assert C.build_config(preset, overrides).hflip is True


def test_folder_defaults_are_printed_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.Trainer, "run", lambda self: 0)  # only the start-up
    argv = ["--data", "folder", "--data-path", str(tmp_path), "--lr", "5e-4", "--device", "cpu"]
    assert train.main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("folder defaults")]
    assert len(line) == 1
    assert "--model DiT-Ti/2 (64 tokens at 16 px)" in line[0] and "--noise-schedule cosine" in line[0]
    assert "--hflip false" in line[0] and "--max-steps 3000" in line[0] and "--lr" not in line[0]
    assert train.main(["--max-steps", "1", "--run-dir", str(tmp_path / "toy")]) == 0  # toy: no such line
    assert "folder defaults" not in capsys.readouterr().out


def test_hflip_off_means_no_flips(tmp_path):
    from conftest import make_folder

    data = make_folder(tmp_path / "imgs", counts=(2, 2), size=16)
    flips = {}
    for hflip in ("true", "false"):
        cfg, _ = folder_config("--hflip", hflip, "--global-batch-size", "64", "--device", "cpu")
        cfg.data_path, cfg.run_dir = str(data), str(tmp_path / f"run-{hflip}")
        trainer = train.Trainer(cfg, "toy")
        trainer.prepare()
        flips[hflip] = torch.stack([trainer.step_noise(s)[3] for s in range(4)])
    assert not flips["false"].any()
    assert 0.3 < flips["true"].float().mean() < 0.7


def test_runs_saved_before_hflip_resume_with_flips():
    cfg = C.build_config("toy", {"data": "folder", "data_path": "imgs", "hflip": True})
    saved = {k: v for k, v in C.to_dict(cfg).items() if k != "hflip"}
    assert C.differences(saved, cfg) == []
    assert C.differences(saved, C.build_config("toy", {"data": "folder", "data_path": "imgs", "hflip": False}))
