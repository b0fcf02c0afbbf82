"""minidit.bench: it times the trainer's own step; the reference baseline; timing, noise, outputs and the CLI."""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from minidit import bench, train
from minidit.errors import run_cli

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]

#: A CLI run small enough for a unit test (~1-2 s on 2 cores): 2 blocks of 4 tokens.
TINY = ["--device", "cpu", "--model", "DiT-Ti/8", "--input-size", "16", "--num-classes", "10", "--batch-size", "2",
        "--warmup", "1", "--iters", "1", "--repeats", "3"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """These tests check results, not speed: one thread keeps tiny ops fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(**kw) -> argparse.Namespace:
    """The settings of ``TINY`` (as ``bench.resolve`` fills them in), with ``kw`` changed."""
    spec, _ = bench.resolve(bench.build_parser().parse_args(TINY))
    return argparse.Namespace(**{**vars(spec), **kw})


def quiet_run(spec: argparse.Namespace, rows) -> dict:
    return bench.run_benchmark(spec, rows, log=lambda s: None)


# -- the step that is timed is the trainer's -------------------------------------------------------------


def test_every_timed_step_is_a_call_of_the_trainers_train_step(monkeypatch):
    calls = []
    real = train.train_step

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting)
    spec = tiny_spec(warmup=1, iters=2, repeats=2)
    result = quiet_run(spec, bench.parse_configs("sdpa", CPU))
    assert [r["status"] for r in result["training"]] == ["ok", "ok"]
    assert len(calls) == 2 * (spec.warmup + spec.repeats * spec.iters)  # two rows, nothing timed besides it
    assert {c["accum"] for c in calls} == {1} and {c["ema_decay"] for c in calls} == {bench.EMA_DECAY}


def test_the_reference_baseline_is_the_plain_optimizer_and_the_loop_ema(monkeypatch):
    """ref: torch.optim.AdamW(model.parameters()) as the reference calls it (per-tensor loop on a CPU), every
    parameter, the loop EMA, fp32, no label-drop mask (the model's own dropout); minidit's row: the trainer's."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    spec = tiny_spec()
    ref = bench.TrainStep(spec, bench.reference_row(CPU), CPU)
    group = ref.opt.param_groups[0]
    assert (group["foreach"], group["fused"]) == (False, False)
    assert _default_to_fused_or_foreach([torch.zeros(1)], differentiable=False) == (False, False)  # torch's default
    assert len(group["params"]) == len(list(ref.model.parameters()))  # pos_embed included, as the reference passes
    assert all(b.attn.backend == "sdpa" for b in ref.model.blocks)  # timm >= 0.9's fused_attn
    ours = bench.TrainStep(spec, bench.parse_config("minidit", CPU), CPU)
    assert ours.opt.param_groups[0]["fused"] is True
    assert len(ours.opt.param_groups[0]["params"]) == len(list(ours.model.parameters())) - 1  # not pos_embed

    seen = {}
    monkeypatch.setattr(train, "train_step", lambda *a, **kw: seen.setdefault(len(seen), (a, kw)))
    ref.step()
    ours.step()
    (ref_args, ref_kw), (our_args, our_kw) = seen[0], seen[1]
    assert ref_kw["ema_update"] is bench.reference_ema_update and our_kw["ema_update"] is train.update_ema
    assert ref_kw["amp_dtype"] is None and ref_kw["scaler"] is None
    assert ref_args[1] is ref.model and ref_args[2] is ref.ema and ref_args[3] is ref.opt
    ref_drop, our_drop = list(ref_args[5])[0][4], list(our_args[5])[0][4]
    assert ref_drop is None and our_drop.shape == (spec.batch_size,)


def test_reference_ema_loop_matches_the_formula_and_minidit_ema_on_the_trained_weights():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = [0.9 * e.detach() + 0.1 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    bench.reference_ema_update(ema, model, 0.9)
    for e, w in zip(ema.parameters(), want):
        torch.testing.assert_close(e, w)
    ema2 = torch.nn.Linear(3, 2)
    ema2.load_state_dict(ema.state_dict())
    bench.reference_ema_update(ema, model, 0.5)
    train.update_ema(ema2, model, 0.5)
    for a, b in zip(ema.parameters(), ema2.parameters()):
        torch.testing.assert_close(a, b)


def test_a_step_trains_the_model_and_moves_the_ema():
    for row in (bench.reference_row(CPU), bench.parse_config("sdpa+ckpt", CPU)):
        runner = bench.TrainStep(tiny_spec(), row, CPU)
        assert runner.model.grad_checkpointing == row.grad_checkpointing
        before = [p.detach().clone() for p in runner.model.parameters()]
        ema_before = [p.detach().clone() for p in runner.ema.parameters()]
        sums = runner.step()
        assert sums.shape == (3,) and torch.isfinite(sums).all()
        assert any(not torch.equal(a, b) for a, b in zip(before, runner.model.parameters())), "no optimizer step"
        assert any(not torch.equal(a, b) for a, b in zip(ema_before, runner.ema.parameters())), "no EMA update"


# -- arithmetic and timing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 80GB HBM3", "fp32", 494),
        ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H200", "bf16", 989), ("NVIDIA H200 NVL", "bf16", 835),
        ("NVIDIA GH200 480GB", "bf16", 989),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "fp32", 156), ("NVIDIA L4", "bf16", 121),
        ("NVIDIA L40S", "bf16", 362), ("Tesla T4", "fp16", 65), ("Tesla T4", "bf16", None),
        ("NVIDIA GeForce RTX 4090", "bf16", 165), ("NVIDIA A10G", "bf16", 125), ("Some Future GPU", "bf16", None),
    ],
)  # fmt: skip
def test_peak_table_lookup(name, precision, expected):
    assert bench.peak_tflops(name, precision) == expected


def test_flops_come_from_model_stats_and_mfu_is_na_on_a_cpu():
    from minidit.stats import model_stats

    result = quiet_run(tiny_spec(repeats=1), [bench.reference_row(CPU)])
    gmacs = model_stats("DiT-Ti/8", input_size=16, num_classes=10).gmacs
    assert result["model"]["forward_gmacs_per_image"] == pytest.approx(gmacs) and result["model"]["tokens"] == 4
    row = result["training"][0]
    assert row["tflops"] == pytest.approx(row["images_per_s"] * 6 * gmacs / 1e3)  # 3 forwards x 2 FLOPs per MAC
    assert row["mfu"] is None and row["memory_bytes"] is None


def test_summarize_median_quartiles_and_range():
    s = bench.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert s["spread"] == pytest.approx(2.0 / 3.0)  # IQR / median
    assert bench.summarize([4.0, 1.0])["median"] == 2.5 and bench.summarize([7.0])["median"] == 7.0
    with pytest.raises(ValueError):
        bench.summarize([])


def test_time_per_call_divides_by_iters_and_calls_fn_that_often():
    ticks = iter([10.0, 16.0])  # a fake clock: 6 s for the whole batch of calls
    calls = []
    assert bench.time_per_call(lambda: calls.append(1), 3, CPU, clock=lambda: next(ticks)) == pytest.approx(2.0)
    assert len(calls) == 3


# -- rows ------------------------------------------------------------------------------------------------


def test_reference_rows():
    ref = bench.reference_row(CPU)
    assert (ref.name, ref.reference, ref.precision, ref.attn, ref.compile) == ("ref", True, "fp32", "sdpa", False)
    assert (ref.optimizer, ref.ema) == ("plain", "loop")
    assert bench.reference_row(torch.device("cuda")).optimizer == "foreach"  # torch's default on CUDA
    assert bench.reference_row(CPU, "ref-2023") == replace(ref, name="ref-2023", attn="math")
    assert "extra" in bench.ROW_LABELS["ref-2023"]


def test_parse_configs_prepends_the_reference_and_reads_tokens():
    rows = bench.parse_configs("bf16,bf16+sdpa,bf16+math+compile+ckpt,fp32+opt=plain+ema=loop,flash", CPU)
    assert [r.name for r in rows] == ["ref", "bf16", "bf16+sdpa", "bf16+math+compile+ckpt", "fp32+opt=plain+ema=loop",
                                      "flash"]  # fmt: skip
    assert rows[0] == bench.reference_row(CPU)
    assert (rows[1].precision, rows[1].optimizer, rows[1].ema, rows[1].reference) == ("bf16", "fused", "foreach", False)
    assert (rows[3].attn, rows[3].compile, rows[3].grad_checkpointing) == ("math", True, True)
    assert (rows[4].optimizer, rows[4].ema) == ("plain", "loop") and rows[5].attn == "flash_attn"
    assert [r.name for r in bench.parse_configs("ref,sdpa,ref,sdpa", CPU)] == ["ref", "sdpa"]
    assert bench.parse_configs("ref-2023", CPU)[1] == bench.reference_row(CPU, "ref-2023")
    assert bench.parse_config("minidit", CPU).compile is False
    assert bench.parse_config("minidit", torch.device("cuda")).precision == "bf16"


@pytest.mark.parametrize("bad", ["bf17", "bf16++sdpa", "sdpa+ref", "bf16+ref-2023", "opt=adam"])
def test_parse_configs_refuses_unknown_items(bad):
    with pytest.raises(bench.UserError, match="unknown item"):
        bench.parse_configs(bad, CPU)


def test_gpu_features_are_skipped_on_cpu_with_a_note():
    for config in ("bf16", "fp16", "flash"):
        assert "CUDA" in bench.skip_reason(bench.parse_config(config, CPU), CPU, quick=False)
    assert "--quick" in bench.skip_reason(bench.parse_config("compile", CPU), CPU, quick=True)
    assert bench.skip_reason(bench.parse_config("compile", CPU), CPU, quick=False) is None
    assert bench.skip_reason(bench.parse_config("sdpa+ckpt", CPU), CPU, quick=True) is None


def test_flash_rows_need_half_precision_and_the_package(monkeypatch):
    cuda = torch.device("cuda")  # only named: nothing runs on it
    assert "bf16 or fp16" in bench.skip_reason(bench.parse_config("flash", cuda), cuda, quick=False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` fails, as where it is not installed
    assert "not installed" in bench.skip_reason(bench.parse_config("fp16+flash", cuda), cuda, quick=False)
    assert bench.skip_reason(bench.parse_config("fp16", cuda), cuda, quick=False) is None


# -- whole runs ------------------------------------------------------------------------------------------


def test_bench_returns_rows_with_the_reference_first_and_ratios_against_it():
    spec = tiny_spec()
    result = quiet_run(spec, bench.parse_configs("sdpa,bf16,ref-2023", CPU))
    ref, sdpa, bf16, old = result["training"]
    assert [r["name"] for r in result["training"]] == ["ref", "sdpa", "bf16", "ref-2023"]
    assert ref["x_ref"] == 1.0 and bf16["status"] == "skipped" and bf16["x_ref"] is None
    for r in (ref, sdpa, old):
        assert r["status"] == "ok" and len(r["raw_step_s"]) == spec.repeats and r["time_s"]["n"] == spec.repeats
        assert r["time_s"]["min"] <= r["time_s"]["median"] <= r["time_s"]["max"]
        assert r["images_per_s"] == pytest.approx(spec.batch_size / r["time_s"]["median"])
        assert r["x_ref"] == pytest.approx(r["images_per_s"] / ref["images_per_s"])
    text = bench.format_report(result)
    assert "ref (reference)" in text and "× ref" in text and "ref-2023 (extra: 2023 math attention)" in text
    json.dumps(result)  # JSON-ready


def test_a_failing_row_is_recorded_and_the_others_still_run(monkeypatch):
    real_step = bench.TrainStep.step

    def broken(self):
        if self.row.name == "sdpa":
            raise RuntimeError("boom\nsecond line")
        return real_step(self)

    monkeypatch.setattr(bench.TrainStep, "step", broken)
    result = quiet_run(tiny_spec(repeats=1), bench.parse_configs("sdpa,math", CPU))
    status = {r["name"]: (r["status"], r["note"]) for r in result["training"]}
    assert status["sdpa"] == ("failed", "RuntimeError: boom")
    assert status["ref"][0] == "ok" and status["math"][0] == "ok"


# -- noise -----------------------------------------------------------------------------------------------

CLEAN = [0.100, 0.101, 0.099, 0.102, 0.098]  # seconds per step: IQR 2% of the median
NOISY = [0.175, 0.180, 5.716, 3.000, 0.190]  # the loaded machine of issue 9: IQR ~15x the median


def synthetic_run(ref_s: list[float], row_s: list[float], load: float) -> dict:
    """A finished run's result with the given timings (nothing is timed): ref and one minidit row."""
    result = {"settings": vars(tiny_spec()), "model": {"tokens": 4, "forward_gmacs_per_image": 0.01},
              "command": "", "device": "cpu", "torch": "", "date": "", "notes": [], "wall_s": 1.0,
              "load_average_start": [load] * 3, "training": []}  # fmt: skip
    for row, samples in ((bench.reference_row(CPU), ref_s), (bench.parse_config("minidit", CPU), row_s)):
        s = bench.summarize(samples)
        res = {"name": row.name, "config": asdict(row), "status": "ok", "note": "", "time_s": s}
        res.update(images_per_s=8 / s["median"], tflops=0.1, mfu=None, memory_bytes=None)
        result["training"].append(res)
    bench.add_ratios(result["training"])
    bench.flag_noise(result, cores=2)
    return result


def test_noisy_timings_give_a_one_line_warning_and_unreliable_ratios():
    result = synthetic_run(NOISY, CLEAN, load=0.5)
    ref, row = result["training"]
    assert row["x_ref"] == pytest.approx(1.9) and row["x_ref_noisy"]  # a "1.9x speed-up" against a noisy reference
    assert not ref["x_ref_noisy"]  # 1.00x is the reference itself
    assert result["noise"] == ["ref: interquartile range 1484% of the median"]
    text = bench.format_report(result)
    warnings = [line for line in text.splitlines() if "noise" in line and "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: these timings are noise")
    assert "uptime" in warnings[0] and "--repeats" in warnings[0]  # how to get clean figures
    assert f"{row['x_ref']:.2f}× (noise)" in text and "1.00× (noise)" not in text


def test_a_noisy_row_marks_its_own_ratio():
    result = synthetic_run(CLEAN, NOISY, load=0.5)
    assert result["training"][1]["x_ref_noisy"] and result["noise"][0].startswith("minidit: ")


def test_an_overloaded_machine_makes_every_ratio_unreliable():
    result = synthetic_run(CLEAN, CLEAN, load=5.3)
    assert result["noise"] == ["load average 5.3 on 2 cores at the start"]
    assert result["training"][1]["x_ref_noisy"] and "1.00× (noise)" in bench.format_report(result)


def test_clean_timings_give_no_warning():
    result = synthetic_run(CLEAN, [t * 0.9 for t in CLEAN], load=1.9)  # below the core count
    assert result["noise"] == [] and not any(r["x_ref_noisy"] for r in result["training"])
    text = bench.format_report(result)
    assert "noise" not in text and "1.11×" in text
    assert bench.NOISY_SPREAD < 0.5  # a spread of half the median is never called clean


# -- the command line ------------------------------------------------------------------------------------


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    assert run_cli(bench.main, TINY + ["--configs", "sdpa,bf16+sdpa", "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "ref (reference)" in printed and "skipped" in printed and "wall time" in printed
    data = json.loads(out.read_text())
    assert data["settings"]["batch_size"] == 2 and data["torch"] == torch.__version__ and data["date"]
    assert data["command"].startswith("python -m minidit.bench") and isinstance(data["noise"], list)
    assert [r["name"] for r in data["training"]] == ["ref", "sdpa", "bf16+sdpa"]
    assert len(data["training"][0]["raw_step_s"]) == 3
    assert "| ref (reference) " in md.read_text() and md.read_text() in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.md"]  # no temporary files left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "DiT-Q/2"], "DiT-Q/2"),
        (["--configs", "ref,bf17"], "bf17"),
        (["--input-size", "30", "--model", "DiT-S/4"], "divisible"),
        (["--json", "/no/such/dir/x.json"], "does not exist"),
        (["--iters", "x"], "not an integer"),
        (["--repat", "3"], "--repeats"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--warmup", "0"], ""),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert run_cli(bench.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_quick_defaults_are_small():
    spec, rows = bench.resolve(bench.build_parser().parse_args(["--quick", "--device", "cpu", "--no-sampling"]))
    assert (spec.model, spec.input_size, spec.batch_size, spec.warmup, spec.iters) == ("DiT-Ti/4", 16, 8, 1, 2)
    assert spec.quick and spec.interleave and [r.name for r in rows] == ["ref", "minidit"]
    assert rows[0] == bench.reference_row(CPU) and rows[1] == bench.parse_config("minidit", CPU)


@pytest.mark.slow
def test_quick_cli_runs(tmp_path):
    """The real --quick run, as the README gives it (a few seconds on an idle 2-core machine)."""
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, "-m", "minidit.bench", "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,  # a hang guard: a busy shared machine takes minutes
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ref (reference)" in proc.stdout and "wall time" in proc.stdout
    data = json.loads(out.read_text())
    assert data["wall_s"] > 0 and [r["status"] for r in data["training"]] == ["ok", "ok"]


def test_minidit_optimizer_on_cpu_is_fused_and_matches_the_reference_adamw():
    """The trainer's CPU AdamW is the fused kernel (the fastest there); it computes what the plain loop does."""
    assert train.optimizer_kind(CPU) == "fused"
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    fused = train.make_optimizer([a], lr=1e-2, weight_decay=0.1, device=CPU)
    plain = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a, b)


def test_gpu_script_is_valid_bash():
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_bench_needs_no_optional_packages():
    """The GPU machine has torch, numpy, einops, tqdm and safetensors, but not diffusers, scipy or nbval."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in {'diffusers', 'scipy', 'nbval', 'matplotlib', 'torchvision', 'PIL',\n"
        "                                  'flash_attn'}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from minidit import bench\n"
        "spec, rows = bench.resolve(bench.build_parser().parse_args(['--quick', '--device', 'cpu', '--model',\n"
        "    'DiT-Ti/8', '--batch-size', '1', '--iters', '1', '--repeats', '1', '--configs', 'ref']))\n"
        "bench.run_benchmark(spec, rows, log=lambda s: None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
