"""Flow matching (minidit.flow) against hand derivations: the linear interpolant of rectified flow / SD3 §3.1,
its velocity target, Euler and Heun on fields whose exact solution is known, logit-normal quantiles, CFG."""

import json
import math
from functools import partial
from statistics import NormalDist

import pytest
import torch

from minidit import sample, train
from minidit.checkpoint import read_file
from minidit.diffusion import create_diffusion
from minidit.errors import UserError, run_cli
from minidit.flow import FlowMatching
from minidit.runtime import sample_generator


def pair(shape=(3, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_the_interpolant_runs_from_data_at_t0_to_noise_at_t1():
    x0, eps = pair()
    flow = FlowMatching()
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = flow.q_sample(x0, t, eps)
    torch.testing.assert_close(xt[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(xt[1], eps[1], rtol=0, atol=0)
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * eps[2])


def test_the_velocity_target_is_the_time_derivative_of_the_interpolant():
    x0, eps = pair()
    flow, h = FlowMatching(), 1e-4
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    dxdt = (flow.q_sample(x0, t + h, eps) - flow.q_sample(x0, t - h, eps)) / (2 * h)
    torch.testing.assert_close(dxdt, eps - x0)
    # the loss of a model that always answers 0 is the mean square of that target, per image; no VB term
    zero = FlowMatching().training_losses(lambda x, s: torch.zeros_like(x), x0, t, noise=eps)
    torch.testing.assert_close(zero["mse"], ((eps - x0) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(zero["loss"], zero["mse"])
    assert zero["vb"].shape == (3,) and not zero["vb"].any()


def test_an_oracle_velocity_has_zero_loss_and_sees_1000t_learned_sigma_channels_ignored():
    x0, eps = pair()
    t = torch.tensor([0.1, 0.5, 0.7])
    seen = []

    def oracle(x, s):  # a learn_sigma-style output: 2C channels, the second half garbage
        seen.append(s)
        return torch.cat([eps - x0, torch.full_like(x0, 1e3)], dim=1)

    losses = FlowMatching().training_losses(oracle, x0, t, noise=eps)
    assert losses["loss"].shape == (3,)
    torch.testing.assert_close(losses["loss"], torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(seen[0], 1000 * t)
    wrong = FlowMatching().training_losses(lambda x, s: x0 - eps, x0, t, noise=eps)  # the sign flipped
    assert (wrong["loss"] > 1).all()


def test_euler_follows_the_straight_lines_to_a_single_data_point_exactly():
    """For data = one point x0 the marginal velocity is v(x, t) = (x - x0) / t: straight lines, which Euler
    follows exactly with any number of steps; one step from x_1 lands on x0."""
    x0, x1 = pair()
    field = lambda x, s: (x - x0) / (s / 1000)[:, None, None, None].double()  # noqa: E731
    for n in (1, 3, 7):
        out = FlowMatching(num_timesteps=n).euler_sample_loop(field, x1.shape, noise=x1)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


def test_heun_equals_euler_on_a_straight_path():
    x0, x1 = pair()
    for n in (1, 4):
        flow = FlowMatching(num_timesteps=n)
        euler = flow.euler_sample_loop(lambda x, s: x1 - x0, x1.shape, noise=x1)
        heun = flow.heun_sample_loop(lambda x, s: x1 - x0, x1.shape, noise=x1)
        torch.testing.assert_close(heun, euler, rtol=0, atol=1e-12)
        torch.testing.assert_close(heun, x0, rtol=0, atol=1e-12)


def global_error(loop: str, n: int) -> float:
    """dx/dt = 2 t x (curved), x(1) = x1: exactly x(0) = x1 exp(-1)."""
    x1 = torch.tensor([[1.5]], dtype=torch.float64)
    field = lambda x, s: 2 * (s / 1000).double()[:, None] * x  # noqa: E731
    out = getattr(FlowMatching(num_timesteps=n), loop)(field, x1.shape, noise=x1)
    return abs(out.item() - 1.5 * math.exp(-1))


@pytest.mark.parametrize("loop, order", [("euler_sample_loop", 1), ("heun_sample_loop", 2)])
def test_halving_the_step_divides_the_error_by_2_for_euler_and_4_for_heun(loop, order):
    ratios = [global_error(loop, n) / global_error(loop, 2 * n) for n in (16, 32, 64)]
    for r in ratios:
        assert r == pytest.approx(2**order, rel=0.08), ratios


@pytest.mark.parametrize("m, s", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_times_have_the_right_quantiles_and_stay_inside_0_1(m, s):
    flow = FlowMatching(t_sampling="logit-normal", logit_mean=m, logit_std=s)
    t = flow.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    for q in (0.1, 0.5, 0.9):
        expected = 1 / (1 + math.exp(-NormalDist(m, s).inv_cdf(q)))
        assert t.quantile(q).item() == pytest.approx(expected, abs=0.01), q
    # one randn from the given generator: the same draws as the trainer's keyed generator gives
    again = torch.sigmoid(m + s * torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(t, again, rtol=0, atol=0)


def test_uniform_times_and_the_diffusion_draw_through_the_same_method():
    t = FlowMatching().sample_timesteps(1000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, torch.rand(1000, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert 0 <= t.min() and t.max() < 1 and 0.45 < t.mean() < 0.55
    steps = create_diffusion("").sample_timesteps(1000, torch.Generator().manual_seed(3))
    expected = torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3))  # the trainer's draw
    torch.testing.assert_close(steps, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logit-normal"):
        FlowMatching(t_sampling="lognormal")


def cfg_inputs(model, n=3):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.tensor([1, 4, 7])[:n]
    return z, y, torch.full_like(y, model.num_classes)


def test_cfg_on_the_velocity_guides_every_channel_and_scale_1_is_the_conditional_velocity(small_dit):
    flow, (z, y, null) = FlowMatching(), cfg_inputs(small_dit)
    t = torch.tensor([0.3, 0.6, 0.9])
    guided = partial(small_dit.forward_with_cfg, guided_channels=None)
    cond = flow.velocity(small_dit, z, t, dict(y=y))
    uncond = flow.velocity(small_dit, z, t, dict(y=null))
    assert cond.shape == z.shape  # the DiT's 2C outputs (learn_sigma) cut to the C velocity channels
    for scale in (1.0, 3.0):
        v = flow.velocity(guided, torch.cat([z, z]), t.repeat(2), dict(y=torch.cat([y, null]), cfg_scale=scale))
        torch.testing.assert_close(v[:3], uncond + scale * (cond - uncond), atol=1e-5, rtol=1e-5)
    one = FlowMatching(num_timesteps=3).heun_sample_loop(
        guided, (6, *z.shape[1:]), noise=torch.cat([z, z]), model_kwargs=dict(y=torch.cat([y, null]), cfg_scale=1.0)
    )
    plain = FlowMatching(num_timesteps=3).heun_sample_loop(small_dit, z.shape, noise=z, model_kwargs=dict(y=y))
    torch.testing.assert_close(one[:3], plain, atol=1e-5, rtol=1e-5)


def test_a_sample_does_not_depend_on_its_batch_with_per_sample_generators(small_dit):
    flow, (_, y, _) = FlowMatching(num_timesteps=2), cfg_inputs(small_dit)
    shape = (small_dit.in_channels, small_dit.input_size, small_dit.input_size)
    gens = lambda idx: [sample_generator(5, i) for i in idx]  # noqa: E731
    whole = flow.euler_sample_loop(small_dit, (3, *shape), model_kwargs=dict(y=y), generator=gens([0, 1, 2]))
    last = flow.euler_sample_loop(small_dit, (1, *shape), model_kwargs=dict(y=y[2:]), generator=gens([2]))
    torch.testing.assert_close(whole[2:], last, atol=1e-5, rtol=1e-5)
    first = flow.euler_sample_loop(small_dit, (1, *shape), model_kwargs=dict(y=y[:1]), generator=gens([0]))
    torch.testing.assert_close(whole[:1], first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[0], whole[2])


def test_clip_denoised_keeps_x0_hat_in_range_and_euler_is_then_ddim_on_the_line():
    """With clipping, one Euler step from t to t' lands on (t'/t) x_t + (1 - t'/t) clamp(x_t - t v, -1, 1)."""
    x0, x1 = pair()
    x0 = 3 * x0  # outside [-1, 1]
    field = lambda x, s: x1 - x0  # noqa: E731
    flow = FlowMatching(num_timesteps=2)
    t, tn = torch.full((3,), 0.5), torch.full((3,), 0.25)
    xt = flow.q_sample(x0, t, x1)
    step = flow.euler_step(field, xt, t, tn, clip_denoised=True)
    torch.testing.assert_close(step, 0.5 * xt + 0.5 * x0.clamp(-1, 1))
    out = flow.euler_sample_loop(field, x1.shape, noise=x1, clip_denoised=True)
    assert out.abs().max() <= 1 and torch.equal(out, out.clamp(-1, 1))
    assert (flow.euler_sample_loop(field, x1.shape, noise=x1) - x0).abs().max() < 1e-12  # unclipped: exact


def test_generate_samples_a_flow_model_guided_on_every_channel_independent_of_the_batch(small_dit):
    labels = torch.tensor([1, 2, 3])
    kw = dict(cfg_scale=3.0, num_steps=3, seed=4, objective="flow")
    whole = sample.generate(small_dit, labels, sampler="heun", **kw)
    apart = sample.generate(small_dit, labels, sampler="heun", batch_size=2, guided_channels=3, **kw)
    torch.testing.assert_close(whole, apart, atol=1e-4, rtol=1e-5)  # guided_channels ignored: all, always
    # by hand: Heun on the guided velocity of all four channels, from sample i's own noise
    z = torch.stack([torch.randn(4, 8, 8, generator=sample_generator(4, i)) for i in range(3)])
    null = torch.full_like(labels, small_dit.num_classes)
    fn = partial(small_dit.forward_with_cfg, guided_channels=None)
    x = FlowMatching(3).heun_sample_loop(
        fn, (6, 4, 8, 8), torch.cat([z, z]), dict(y=torch.cat([labels, null]), cfg_scale=3.0)
    )
    torch.testing.assert_close(whole, x[:3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole, sample.generate(small_dit, labels, **kw))  # the default, Euler, differs


@pytest.mark.parametrize(
    "objective, sampler, other", [("flow", "ddim", "euler or heun"), ("ddpm", "heun", "ddpm or ddim")]
)
def test_a_sampler_of_the_other_objective_is_one_line(small_dit, objective, sampler, other):
    with pytest.raises(UserError, match=f"--sampler {sampler}: this model was trained with --objective {objective}: "
                       f"choose {other}"):  # fmt: skip
        sample.generate(small_dit, torch.tensor([1]), num_steps=2, objective=objective, sampler=sampler)


# --------------------------------------------------------------------------
# python -m minidit.train --objective flow, and python -m minidit.sample on its run
# --------------------------------------------------------------------------

FLOW = [
    "--objective", "flow", "--model", "DiT-Ti/8", "--global-batch-size", "8", "--max-steps", "4", "--log-every", "2",
    "--ckpt-every", "2", "--sample-every", "0", "--sample-steps", "3", "--samples-per-class", "1",
    "--eval-samples", "0", "--warmup-steps", "2", "--device", "cpu",
]  # fmt: skip


def last_state(run_dir):
    return read_file(run_dir / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("flow") / "full"
    assert train.main([*FLOW, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_objective_flow_records_it_and_learns_the_velocity_loss(flow_run):
    state = last_state(flow_run)
    assert state["config"]["objective"] == "flow" and state["config"]["t_sampling"] == "uniform"
    rows = [json.loads(r) for r in (flow_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["vb"] == 0 and math.isfinite(r["loss"]) and r["loss"] == r["mse"] for r in rows)


def test_a_flow_run_resumes_bit_exactly(flow_run, tmp_path):
    part = tmp_path / "part"
    assert train.main([*FLOW, "--run-dir", str(part), "--max-steps", "2"]) == 0
    assert last_state(part)["step"] == 2
    assert train.main([*FLOW, "--run-dir", str(part)]) == 0  # --max-steps 4 again: continues
    a, b = last_state(flow_run), last_state(part)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    opt_a, opt_b = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)


def test_logit_normal_training_times_change_what_is_trained(flow_run, tmp_path):
    other = tmp_path / "ln"
    assert train.main([*FLOW, "--run-dir", str(other), "--t-sampling", "logit-normal"]) == 0
    assert last_state(other)["config"]["t_sampling"] == "logit-normal"
    a, b = last_state(flow_run)["model"], last_state(other)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_a_flow_run_through_the_cli(flow_run, capsys):
    for sampler in ("euler", "heun"):
        args = ["--ckpt", str(flow_run), "--classes", "0,3", "--per-class", "1", "--num-steps", "3", "--device", "cpu"]
        assert sample.main([*args, "--sampler", sampler]) == 0
        assert (flow_run / "samples" / f"grid_cfg4_{sampler}3_seed0.png").is_file()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_diffusion_sampler_on_a_flow_run_is_one_line(flow_run, sampler, capsys):
    args = ["--ckpt", str(flow_run), "--num-steps", "3", "--device", "cpu", "--sampler", sampler]
    assert run_cli(sample.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flow" in err and "euler" in err and "heun" in err


def test_the_trainer_draws_its_grids_with_the_runs_objective(tmp_path, monkeypatch):
    calls, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert train.main([*FLOW, "--run-dir", str(tmp_path / "r"), "--max-steps", "1"]) == 0
    assert calls and all(k["objective"] == "flow" for k in calls)


def test_guiding_some_channels_of_a_flow_run_is_one_line(flow_run, capsys):
    args = ["--ckpt", str(flow_run), "--num-steps", "3", "--device", "cpu", "--guided-channels", "3"]
    assert run_cli(sample.main, args) == 2
    assert capsys.readouterr().err.strip() == "error: --guided-channels 3: a flow model is guided on all its channels"
