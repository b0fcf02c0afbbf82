"""The checks of lesson 11 are real: right answers pass with one line, stubs fail, and the usual mistakes are
each rejected with the hint that names them.

The right answers and the mistakes are written here by hand from the formulas (SD3 §2 and §3.1: the linear
interpolant, its velocity, logit-normal t; Heun's method as in SiT's ODE sampler), not taken from minidit, so a
check that compared minidit with itself would not pass these tests.
"""

import math

import pytest
import torch
from exercises import assert_fails, assert_passes, stub

from minidit.course import lesson11


def col(t, x):
    return t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# --------------------------------------------------------------------------
# 11.1 (interpolant)
# --------------------------------------------------------------------------

INTERPOLANT = "11.1 (interpolant)"


def interpolant(x_0, eps, t, ends="right", sign=1, target="velocity", shape="column", cast=True, sqrt=False):
    """The right answer; each keyword switches on one mistake."""
    tb = t.view(-1, *([1] * (x_0.ndim - 1))) if shape == "column" else t
    if cast:
        tb = tb.to(x_0.dtype)
    if sqrt:
        x_t = (1 - tb).sqrt() * x_0 + tb.sqrt() * eps
    else:
        x_t = (1 - tb) * x_0 + tb * eps if ends == "right" else tb * x_0 + (1 - tb) * eps
    v = {"velocity": sign * (eps - x_0), "eps": eps, "eps - x_t": eps - x_t, "x0": x_0}[target]
    return x_t, v


INTERPOLANT_MISTAKES = {
    "t at the wrong end": (dict(ends="swapped"), "t is at the wrong end"),
    "variance-preserving square roots": (dict(sqrt=True), "has no square roots"),
    "v sign flipped": (dict(sign=-1), "v has the wrong sign"),
    "eps as the target": (dict(target="eps"), "DDPM's target"),
    "eps - x_t": (dict(target="eps - x_t"), "it does not involve x_t"),
    "x_0 as the target": (dict(target="x0"), "x_0-prediction"),
    "t broadcast along W": (dict(shape="flat"), "broadcast along the last axis"),
    "t's float64 kept": (dict(cast=False), "keeps x_0's dtype"),
}


def test_interpolant_right_answer_passes(capsys):
    assert_passes(lesson11.check_interpolant, interpolant, INTERPOLANT, capsys)


def test_interpolant_stub_fails():
    assert_fails(lesson11.check_interpolant, stub, INTERPOLANT, "not implemented yet")


@pytest.mark.parametrize("name", INTERPOLANT_MISTAKES)
def test_interpolant_mistakes_are_named(name):
    kwargs, hint = INTERPOLANT_MISTAKES[name]
    assert_fails(lesson11.check_interpolant, lambda *a: interpolant(*a, **kwargs), INTERPOLANT, hint)


def test_interpolant_return_types():
    assert_fails(lesson11.check_interpolant, lambda *a: interpolant(*a)[0], INTERPOLANT, "return a pair")
    numpy = lambda *a: tuple(z.numpy() for z in interpolant(*a))  # noqa: E731
    assert_fails(lesson11.check_interpolant, numpy, INTERPOLANT, "x_t should be a torch.Tensor")


# --------------------------------------------------------------------------
# 11.2 (euler_step)
# --------------------------------------------------------------------------

EULER = "11.2 (euler_step)"


def velocity(model, x, t, feed="1000t", channels="first"):
    C = x.shape[1]
    s = {"1000t": 1000 * t, "t": t, "rounded": (1000 * t).round(), "1-t": 1000 * (1 - t)}[feed]
    out = model(x, s)
    return {"first": out[:, :C], "last": out[:, C:], "three": out[:, :3]}[channels]


def euler_step(model, x, t, t_next, feed="1000t", direction=1, dt=True, channels="first", dtype=None, at="t"):
    v = velocity(model, x, t if at == "t" else t_next, feed, channels)
    h = col(t_next - t, x) if dt else 1.0
    out = x + direction * h * v
    return out if dtype is None else out.to(dtype)


EULER_MISTAKES = {
    "t fed instead of 1000 t": (dict(feed="t"), "you fed the model t in [0, 1]"),
    "rounded 1000 t": (dict(feed="rounded"), "keep 1000 · t a float"),
    "1000 (1 - t)": (dict(feed="1-t"), "you fed 1000 · (1 - t)"),
    "slope at t_next": (dict(at="t_next"), "not 1000 · t_next"),
    "dt sign": (dict(direction=-1), "the step goes the wrong way"),
    "no step size": (dict(dt=False), "without the step size"),
    "variance channels": (dict(channels="last"), "the FIRST C channels"),
    "C hard-coded to 3": (dict(channels="three"), "take the first C of the model's output, not 3"),
    "float64 result": (dict(dtype=torch.float64), "keep the images' dtype"),
}


def test_euler_step_right_answer_passes(capsys):
    assert_passes(lesson11.check_euler_step, euler_step, EULER, capsys)


def test_euler_step_stub_fails():
    assert_fails(lesson11.check_euler_step, stub, EULER, "not implemented yet")


@pytest.mark.parametrize("name", EULER_MISTAKES)
def test_euler_step_mistakes_are_named(name):
    kwargs, hint = EULER_MISTAKES[name]
    assert_fails(lesson11.check_euler_step, lambda *a: euler_step(*a, **kwargs), EULER, hint)


def test_euler_step_shape_type_and_calls():
    def all_channels(model, x, t, t_next):
        return x.repeat(1, 2, 1, 1) + col(t_next - t, x) * model(x, 1000 * t)

    def twice(model, x, t, t_next):
        model(x, 1000 * t)
        return euler_step(model, x, t, t_next)

    assert_fails(lesson11.check_euler_step, all_channels, EULER, "use only the first C")
    assert_fails(lesson11.check_euler_step, twice, EULER, "called `model` 2 times")
    assert_fails(lesson11.check_euler_step, lambda *a: euler_step(*a).numpy(), EULER, "should be a torch.Tensor")
    assert_fails(lesson11.check_euler_step, lambda m, x, t, tn: x.clone(), EULER, "never called `model`")


# --------------------------------------------------------------------------
# 11.3 (heun_step)
# --------------------------------------------------------------------------

HEUN = "11.3 (heun_step)"


def heun_step(model, x, t, t_next, feed="1000t", second_time="t_next", second_at="euler", combine="mean",
              direction=1, euler_at_end=False, dtype=None, channels="first"):  # fmt: skip
    h = col(t_next - t, x)
    v = velocity(model, x, t, feed, channels)
    if euler_at_end == "batch" and bool((t_next == 0).all()):
        return x + h * v
    guess = x + direction * h * v
    v2 = velocity(model, guess if second_at == "euler" else x, t_next if second_time == "t_next" else t, feed, channels)
    slope = {"mean": (v + v2) / 2, "sum": v + v2, "second": v2, "guess": None}[combine]
    out = guess if combine == "guess" else x + direction * h * slope
    if euler_at_end == "rows":
        out = torch.where(col(t_next == 0, x).bool(), x + h * v, out)
    return out if dtype is None else out.to(dtype)


HEUN_MISTAKES = {
    "t fed instead of 1000 t": (dict(feed="t"), "you fed the model t in [0, 1]"),
    "second slope at time t": (dict(second_time="t"), "the second slope was taken at time t"),
    "second slope at x": (dict(second_at="x"), "you evaluated it at x itself"),
    "second slope alone": (dict(combine="second"), "the second slope alone"),
    "slopes summed": (dict(combine="sum"), "summed, not averaged"),
    "Euler guess returned": (dict(combine="guess"), "you returned the Euler guess"),
    "dt sign": (dict(direction=-1), "the wrong way"),
    "Euler at the last step": (dict(euler_at_end="batch"), "at the last step (t_next = 0)"),
    "Euler where t_next = 0, per image": (dict(euler_at_end="rows"), "at the last step (t_next = 0)"),
    "float64 result": (dict(dtype=torch.float64), "keep the images' dtype"),
    "C hard-coded to 3": (dict(channels="three"), "take the first C of the model's output, not 3"),
}


def test_heun_step_right_answer_passes(capsys):
    assert_passes(lesson11.check_heun_step, heun_step, HEUN, capsys)


def test_heun_step_stub_fails():
    assert_fails(lesson11.check_heun_step, stub, HEUN, "not implemented yet")


@pytest.mark.parametrize("name", HEUN_MISTAKES)
def test_heun_step_mistakes_are_named(name):
    kwargs, hint = HEUN_MISTAKES[name]
    assert_fails(lesson11.check_heun_step, lambda *a: heun_step(*a, **kwargs), HEUN, hint)


def test_heun_step_is_not_euler():
    assert_fails(lesson11.check_heun_step, euler_step, HEUN, "evaluates the velocity twice")


# --------------------------------------------------------------------------
# 11.4 (sample_timesteps)
# --------------------------------------------------------------------------

TIMESTEPS = "11.4 (sample_timesteps)"


def sample_timesteps(n, generator, t_sampling="uniform", logit_mean=0.0, logit_std=1.0, draw="randn", use_ms=True,
                     square=False, squash=True, flip=False, always=None, dtype=torch.float32, extra=False):  # fmt: skip
    kind = always or t_sampling
    if kind == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        if draw == "randn":
            z = torch.randn(n, generator=generator)
        elif draw == "global":
            z = torch.randn(n)
        else:  # a normal made from a uniform draw, through the inverse CDF
            z = math.sqrt(2) * torch.erfinv(2 * torch.rand(n, generator=generator) - 1)
        m, s = (logit_mean, logit_std**2 if square else logit_std) if use_ms else (0.0, 1.0)
        u = m + s * z
        t = torch.sigmoid(u) if squash else u
        t = 1 - t if flip else t
    if extra:
        torch.rand(1, generator=generator)
    return t.to(dtype)


def sample_timesteps_normal(n, generator, t_sampling="uniform", logit_mean=0.0, logit_std=1.0):
    """torch.normal from the generator: the same numbers as m + s · randn."""
    if t_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator))


TIMESTEPS_MISTAKES = {
    "uniform for logit-normal": (dict(always="uniform"), "you drew uniform t"),
    "logit-normal for uniform": (dict(always="logit-normal"), "asks for t ~ U[0, 1)"),
    "m and s ignored": (dict(use_ms=False), "you ignored logit_mean and logit_std"),
    "s squared": (dict(square=True), "not by its square"),
    "no sigmoid": (dict(squash=False), "map it into (0, 1)"),
    "inverse CDF of a uniform draw": (dict(draw="icdf"), "right distribution from the wrong random draws"),
    "1 - sigmoid": (dict(flip=True), "not 1 - sigmoid(n)"),
    "global RNG": (dict(draw="global"), "you did not draw from `generator`"),
    "float64": (dict(dtype=torch.float64), "float32"),
    "one draw too many": (dict(extra=True), "draw exactly ONE tensor"),
}


def test_sample_timesteps_right_answers_pass(capsys):
    assert_passes(lesson11.check_sample_timesteps, sample_timesteps, TIMESTEPS, capsys)
    assert_passes(lesson11.check_sample_timesteps, sample_timesteps_normal, TIMESTEPS, capsys)


def test_sample_timesteps_stub_fails():
    assert_fails(lesson11.check_sample_timesteps, stub, TIMESTEPS, "not implemented yet")


@pytest.mark.parametrize("name", TIMESTEPS_MISTAKES)
def test_sample_timesteps_mistakes_are_named(name):
    kwargs, hint = TIMESTEPS_MISTAKES[name]
    assert_fails(lesson11.check_sample_timesteps, lambda *a: sample_timesteps(*a, **kwargs), TIMESTEPS, hint)


def test_sample_timesteps_numpy_is_rejected():
    numpy = lambda *a: sample_timesteps(*a).numpy()  # noqa: E731
    assert_fails(lesson11.check_sample_timesteps, numpy, TIMESTEPS, "should be a torch.Tensor")


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pairs = [(lesson11.check_interpolant, interpolant), (lesson11.check_euler_step, euler_step),
             (lesson11.check_heun_step, heun_step), (lesson11.check_sample_timesteps, sample_timesteps)]  # fmt: skip
    for check, fn in pairs:
        check(fn)
    assert torch.equal(torch.get_rng_state(), before)
