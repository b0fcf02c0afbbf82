"""minidit.scaling: the toy scaling sweep (paper section 4) writes a results file, resumes, fits, plots, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minidit import scaling
from minidit.errors import UserError, run_cli
from minidit.stats import model_stats

TINY = ["w32-d1-p8", "w32-d1-p4"]


def fake_result(n: int = 4) -> dict:
    """A results file's contents without training: loss falling with Gflops."""
    runs = []
    for i in range(n):
        g = 0.001 * 4**i
        runs.append(dict(name=f"w32-d{i + 1}-p4", params=10_000 * (n - i), tokens=16, gflops=g,
                         train_loss=0.5 * g**-0.1, heldout_loss=0.4 * g**-0.1, accuracy_cfg4=0.1 * i,
                         wall_s=1.0, load_average=[1.0, 1.5]))  # fmt: skip
    return dict(command="python -m minidit.scaling run --steps 3", date="2026-12-01", machine="cpu", torch="2",
                settings={"steps": 3, "seed": 0, "eval_samples": 4}, runs=runs)  # fmt: skip


def test_sweep_writes_results_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    result = scaling.run(TINY, 3, out, seed=0, eval_samples=4, command="test", progress=False)
    saved = json.loads(out.read_text())
    assert saved == result and [r["name"] for r in saved["runs"]] == TINY
    assert saved["settings"] == {"steps": 3, "seed": 0, "eval_samples": 4} and saved["recipe"]["lr"] == 2e-3
    cfg = scaling.recipe(0)
    for row in saved["runs"]:
        stats = model_stats(scaling.build(row["name"], cfg))
        assert (row["params"], row["tokens"], row["gflops"]) == (stats.params, stats.tokens, stats.gmacs)
        assert row["tokens"] == (16 // row["patch_size"]) ** 2
        for key in ("train_loss", "heldout_loss", "heldout_mse"):
            assert np.isfinite(row[key]) and row[key] > 0
        assert 0 <= row["accuracy_cfg4"] <= 1 and len(row["load_average"]) == 2
    # the per-config results differ (different models), and the held-out loss is reproducible
    assert saved["runs"][0]["heldout_loss"] != saved["runs"][1]["heldout_loss"]

    def no_training(*args, **kwargs):
        raise AssertionError("a config already in the results file was trained again")

    monkeypatch.setattr(scaling, "train_config", no_training)
    again = scaling.run(TINY, 3, out, seed=0, eval_samples=4, command="test", progress=False)
    assert again == saved and json.loads(out.read_text()) == saved


def test_resume_trains_only_missing_configs(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    partial = fake_result(1)
    partial["runs"][0]["name"] = TINY[0]
    out.write_text(json.dumps(partial))
    trained = []

    def fake_train(name, steps, cfg, eval_samples, progress=True):
        trained.append(name)
        return dict(fake_result(1)["runs"][0], name=name)

    monkeypatch.setattr(scaling, "train_config", fake_train)
    scaling.run(TINY, 3, out, seed=0, eval_samples=4, command="test", progress=False)
    assert trained == [TINY[1]]
    assert [r["name"] for r in json.loads(out.read_text())["runs"]] == TINY


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "sweep.json"
    out.write_text(json.dumps(fake_result()))
    with pytest.raises(UserError, match="same settings"):
        scaling.run(TINY, 5, out, seed=0, eval_samples=4, command="test", progress=False)


def test_heldout_loss_is_fixed_and_tracks_the_weights():
    cfg = scaling.recipe(0)
    torch.manual_seed(0)
    model = scaling.build("w32-d1-p8", cfg)
    diffusion = scaling.make_objective(cfg)
    first = scaling.heldout_loss(model, cfg, diffusion)
    assert scaling.heldout_loss(model, cfg, diffusion) == first
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()  # adaLN-Zero starts at zero output: move it
    assert scaling.heldout_loss(model, cfg, diffusion) != first


def test_gflops_equal_model_stats_and_grow_with_tokens():
    cfg = scaling.recipe(0)
    rows = [model_stats(scaling.build(f"w64-d2-p{p}", cfg)) for p in (8, 4, 2)]
    assert [s.tokens for s in rows] == [4, 16, 64]
    assert rows[0].gmacs < rows[1].gmacs < rows[2].gmacs
    assert scaling.parse_config("w128-d4-p2") == dict(hidden_size=128, depth=4, patch_size=2, num_heads=4)


@pytest.mark.parametrize("name", ["w30-d1-p4", "w64-d0-p4", "w64-d2-p3", "64-2-4", "w64-d2"])
def test_bad_config_names(name):
    with pytest.raises(UserError):
        scaling.parse_config(name)


def test_fit_power_law_recovers_a_and_b():
    g = np.geomspace(1e-3, 1e-1, 8)
    a, b = scaling.fit_power_law(g, 0.3 * g**-0.07)
    assert a == pytest.approx(0.3, rel=1e-9) and b == pytest.approx(-0.07, rel=1e-9)
    noisy = 2.0 * g**0.5 * np.exp(np.random.default_rng(0).normal(0, 0.01, len(g)))
    a, b = scaling.fit_power_law(list(g), list(noisy))
    assert a == pytest.approx(2.0, rel=0.1) and b == pytest.approx(0.5, abs=0.02)
    for bad in (([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([0.0, 1.0], [1.0, 2.0]), ([1.0, 2.0], [-1.0, 2.0])):
        with pytest.raises(UserError):
            scaling.fit_power_law(*bad)


def test_spearman_and_summary():
    assert scaling.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert scaling.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    s = scaling.summary(fake_result())
    assert s["spearman_gflops"] == pytest.approx(-1.0) and s["spearman_params"] == pytest.approx(1.0)
    assert s["exponent_gflops"] == pytest.approx(-0.1)


def test_plot_and_report(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_result()))
    assert run_cli(scaling.main, ["plot", str(path), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert run_cli(scaling.main, ["report", str(path), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert text == capsys.readouterr().out
    assert "| w32-d1-p4 | 40,000 | 16 | 0.0010 |" in text and "Gflops^-0.100" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--out", "{tmp}/x.json", "--configs", "w64-d2-p5"], "patch divide 16"),
        (["run", "--out", "{tmp}/x.json", "--stepz", "3"], "did you mean --steps"),
        (["report", "{tmp}/missing.json"], "not readable JSON"),
        (["plot", "{tmp}/empty.json"], "holds no runs"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty.json").write_text("{}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(scaling.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_load_results_defaults_to_the_committed_sweep(tmp_path, monkeypatch):
    result = scaling.load_results()  # the file benchmarks/results/ ships (lesson 10 reads it this way)
    assert scaling.COMMITTED_RESULTS.name == "scaling-2026-12-01.json"
    assert [r["name"] for r in result["runs"]] == scaling.DEFAULT_CONFIGS.split(",")
    assert result["settings"]["steps"] == 1200 and result["command"].startswith("python -m minidit.scaling run")
    monkeypatch.setattr(scaling, "COMMITTED_RESULTS", tmp_path / "absent.json")  # a wheel has no benchmarks/
    with pytest.raises(UserError, match="absent.json is missing: the committed sweep ships with the repository"):
        scaling.load_results()
