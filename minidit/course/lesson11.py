"""Checks for lesson 11: flow matching (the linear interpolant of rectified flow, SD3 and SiT).

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs, compares it with the reference
in ``minidit.flow.FlowMatching`` (``q_sample``, ``euler_step``, ``heun_step``, ``sample_timesteps``),
prints one line on success, or raises ``AssertionError`` naming the likely mistake (found by comparing
with known wrong variants, computed here in float64).

The model in the checks is a small deterministic stand-in (``_Field``): a velocity that depends on x and
on the time it is fed, so a step that feeds t instead of 1000 t, or evaluates a slope at the wrong point,
is caught. It records every call.
"""

from __future__ import annotations

import math

import torch

from minidit.flow import FlowMatching

from . import checks

FLOAT32_HINT = "keep the images' dtype (float32): a float64 result would not go through the DiT's float32 layers."


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.ndim - 1)))


def _first_match(got: torch.Tensor, variants, atol: float = 1e-4) -> str | None:
    return next((hint for variant, hint in variants if checks.matches(got, variant, atol=atol)), None)


class _Field:
    """model(x, s) -> [B, 2C, ...]: a velocity (the first C channels) that is a smooth function of x and of the
    time s it is fed (s = 1000 t), then C "variance" channels that a flow ignores; records (x, s) of each call."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), torch.as_tensor(s).detach().clone()))
        sb = _bcast(torch.as_tensor(s).to(x.dtype), x)
        v = torch.tanh(0.7 * x.flip(1) + 0.4 * x) + torch.cos(sb / 170.0) - 0.5 * torch.sin(sb / 410.0 + x)
        return torch.cat([v, 3.0 + x.abs()], dim=1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The first C channels at time t (the model is fed 1000 t), in float64."""
        return self(x.double(), 1000 * t.double())[:, : x.shape[1]]


def _fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values.tolist()) + "]"


def _fed_time_check(ex: str, got: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, which: str) -> None:
    """The time fed to the model must be 1000 t (a float tensor [B]); name the usual slips."""
    got = torch.as_tensor(got)
    expected = 1000 * t
    if tuple(got.shape) != tuple(t.shape):
        checks.fail(ex, f"{which}: the model was fed a time of shape {tuple(got.shape)}, expected {tuple(t.shape)} "
                    "(one time per image, not broadcast to the images' shape).")  # fmt: skip
    g = got.double()
    if torch.allclose(g, expected.double(), atol=1e-3, rtol=0):
        return
    if torch.allclose(g, t.double(), atol=1e-6):
        hint = ("you fed the model t in [0, 1]; its timestep embedding was built (and this DiT trained) for the "
                "range of the DDPM step, 0..999: feed it 1000 · t.")  # fmt: skip
    elif torch.allclose(g, 1000 * t_next.double(), atol=1e-3):
        hint = f"{which} is taken at the START of the step: feed 1000 · t, not 1000 · t_next."
    elif torch.allclose(g, 1000 * (1 - t.double()), atol=1e-3):
        hint = "you fed 1000 · (1 - t): here t = 1 is the noise end, and the model sees 1000 · t."
    elif torch.equal(g, (1000 * t.double()).floor()) or torch.equal(g, (1000 * t.double()).round()):
        hint = "keep 1000 · t a float (no rounding to an integer step): training drew t continuously."
    else:
        hint = "it should see 1000 · t."
    checks.fail(ex, f"{which}: the model was fed {_fmt(g)}, expected 1000 · t = {_fmt(expected)}: {hint}")


# --------------------------------------------------------------------------
# Exercise 11.1 (interpolant)
# --------------------------------------------------------------------------

INTERPOLANT = "11.1 (interpolant)"


def check_interpolant(fn) -> None:
    """Exercise 11.1: ``fn(x_0, eps, t)`` -> (x_t, v), both like x_0: the linear interpolant and its velocity."""
    ex = INTERPOLANT
    flow = FlowMatching()
    cases = [  # (shape, t, dtype of the images); the first has B == W, so t broadcast along W does not crash
        ((4, 3, 4, 4), torch.tensor([0.0, 1.0, 0.25, 0.7]), torch.float32),
        ((3, 2, 5, 6), torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64), torch.float32),
        ((2, 4, 3, 3), torch.tensor([0.3, 0.8], dtype=torch.float64), torch.float64),
    ]
    for k, (shape, t, dtype) in enumerate(cases):
        g = checks.seeded(110 + k)
        x_0 = torch.randn(shape, generator=g).to(dtype)
        eps = torch.randn(shape, generator=g).to(dtype)
        got = checks.call(ex, fn, x_0.clone(), eps.clone(), t.clone())
        if not isinstance(got, tuple) or len(got) != 2:
            checks.fail(ex, "return a pair (x_t, v).")
        x_t = checks.expect_tensor(ex, got[0], "x_t")
        v = checks.expect_tensor(ex, got[1], "v")
        checks.expect_shape(ex, x_t, shape, hints={(shape[0],) + shape: "t has one entry per image: give it the "
                            "shape [B, 1, 1, 1] before it meets the images."})  # fmt: skip
        checks.expect_shape(ex, v, shape)
        for name, tensor in (("x_t", x_t), ("v", v)):
            checks.expect_dtype(ex, tensor, dtype, f"{name} keeps x_0's dtype: cast t to it (here t is "
                                f"{t.dtype}, x_0 is {dtype}); the DiT's layers are float32.")  # fmt: skip
        x0d, epsd, td = x_0.double(), eps.double(), _bcast(t.double(), x_0)
        flat = t.double()  # t broadcast along the last axis (possible when B == W, as in the first case)
        x_t_variants = [
            (td * x0d + (1 - td) * epsd, "t is at the wrong end: x_t must be the data x_0 at t = 0 and the noise eps "
             "at t = 1 (SD3's convention; Liu et al. write the same path with t reversed)."),
            ((1 - td).sqrt() * x0d + td.sqrt() * epsd, "the linear interpolant has no square roots: "
             "x_t = (1 - t) x_0 + t eps (it is not variance-preserving)."),
        ]  # fmt: skip
        if shape[-1] == shape[0]:
            x_t_variants.append(((1 - flat) * x0d + flat * epsd, "t has one entry per image: give it the shape "
                                 "[B, 1, 1, 1]; yours was broadcast along the last axis of the images."))  # fmt: skip
        checks.expect_close(ex, x_t, flow.q_sample(x_0, t, eps), atol=1e-6, rtol=1e-6,
                            diagnose=lambda got, vs=x_t_variants: _first_match(got, vs), what="x_t")  # fmt: skip
        v_variants = [
            (x0d - epsd, "v has the wrong sign: x_t moves from x_0 (t = 0) towards eps (t = 1), so "
             "v = dx_t/dt = eps - x_0."),
            (epsd, "v = eps is DDPM's target; the flow's target is the velocity dx_t/dt of the path."),
            (epsd - x_t.double(), "v is the derivative of x_t with respect to t: differentiate "
             "(1 - t) x_0 + t eps; it does not involve x_t."),
            (x0d, "v = x_0 is the x_0-prediction target; the flow's target is the velocity dx_t/dt."),
        ]  # fmt: skip
        checks.expect_close(ex, v, eps - x_0, atol=1e-6, rtol=1e-6,
                            diagnose=lambda got, vs=v_variants: _first_match(got, vs), what="v")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 11.2 (euler_step) and 11.3 (heun_step)
# --------------------------------------------------------------------------

EULER = "11.2 (euler_step)"
HEUN = "11.3 (heun_step)"

#: (t, t_next) per case: a batch of images at different times, a batch at the last step (t_next = 0), the first.
STEP_CASES = [
    (torch.tensor([1.0, 0.7371, 0.4129, 0.0893]), torch.tensor([0.8, 0.5, 0.3711, 0.0])),
    (torch.tensor([0.2, 0.2, 0.2]), torch.tensor([0.0, 0.0, 0.0])),
    (torch.tensor([1.0, 1.0]), torch.tensor([0.6667, 0.6667])),
]


def _step_inputs(k: int, t: torch.Tensor) -> torch.Tensor:
    """x [B, C, 4, 4] for case k: C = 3 (RGB pixels), then 4 (latents), so that a hard-coded C is caught."""
    return 1.3 * torch.randn(len(t), 3 if k < 2 else 4, 4, 4, generator=checks.seeded(120 + k))


C_HINT = "x has C = x.shape[1] channels (here 4, as for latents): take the first C of the model's output, not 3."


def _call_step(ex: str, fn, model, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor):
    """``checks.call``; a crash on a 4-channel x that mentions a size of 3 most likely comes from a hard-coded C."""
    try:
        return checks.call(ex, fn, model, x.clone(), t.clone(), t_next.clone())
    except checks.ExerciseFailed as err:
        if x.shape[1] != 3 and "(3)" in str(err) and checks.NOT_DONE not in str(err):
            raise checks.ExerciseFailed(f"{err} {C_HINT}") from None
        raise


def _expect_step_result(ex: str, got, x: torch.Tensor) -> torch.Tensor:
    got = checks.expect_tensor(ex, got, "x_next")
    checks.expect_shape(ex, got, tuple(x.shape), hints={
        (x.shape[0], 2 * x.shape[1], *x.shape[2:]): "the model returns 2C channels (velocity, then the learned-"
        "sigma channels a flow ignores): use only the first C."})  # fmt: skip
    checks.expect_dtype(ex, got, x.dtype, FLOAT32_HINT)
    return got


def check_euler_step(fn) -> None:
    """Exercise 11.2: ``fn(model, x, t, t_next)`` -> x at t_next, one Euler step of dx/dt = v_hat(x, t)."""
    ex = EULER
    flow = FlowMatching()
    for k, (t, t_next) in enumerate(STEP_CASES):
        x = _step_inputs(k, t)
        model = _Field()
        got = _expect_step_result(ex, _call_step(ex, fn, model, x, t, t_next), x)
        if not model.calls:
            checks.fail(ex, "your step never called `model`: the velocity is v_hat = model(x, 1000 t)[:, :C].")
        if len(model.calls) > 1:
            checks.fail(ex, f"your step called `model` {len(model.calls)} times: Euler needs one velocity per step.")
        _fed_time_check(ex, model.calls[0][1], t, t_next, "the velocity")
        expected = flow.euler_step(_Field(), x, t, t_next)
        f = _Field()
        v, xd = f.velocity(x, t), x.double()
        h = _bcast(t_next.double() - t.double(), x)
        variants = [
            (xd - h * v, "the step goes the wrong way: time runs from t = 1 (noise) down to t = 0 (data), so "
             "dt = t_next - t is negative; x_next = x + (t_next - t) · v_hat."),
            (xd + v, "you added v_hat without the step size: multiply it by dt = t_next - t."),
            (xd + h * f(xd, 1000 * t.double())[:, x.shape[1]:], "the velocity is the FIRST C channels of the "
             "model's output; the others are the learned-sigma channels, which a flow ignores."),
        ]  # fmt: skip
        checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5,
                            diagnose=lambda got, vs=variants: _first_match(got, vs), what="x_next")  # fmt: skip
    checks.passed(ex)


LAST_STEP_HINT = (
    "at the last step (t_next = 0) minidit's Heun step is a full Heun step too: the flow's velocity is defined at "
    "t = 0 (unlike EDM's sigma = 0, where Karras et al. switch to Euler), so evaluate the second slope there as on "
    "any other step."
)


def check_heun_step(fn) -> None:
    """Exercise 11.3: ``fn(model, x, t, t_next)`` -> x at t_next, one Heun step (2 model calls)."""
    ex = HEUN
    flow = FlowMatching()
    for k, (t, t_next) in enumerate(STEP_CASES):
        x = _step_inputs(k, t)
        model = _Field()
        got = _expect_step_result(ex, _call_step(ex, fn, model, x, t, t_next), x)
        if len(model.calls) < 2:
            hint = "Heun's method evaluates the velocity twice: at (x, t), then at the Euler guess at t_next."
            if len(model.calls) == 1 and bool((t_next == 0).all()):
                hint = LAST_STEP_HINT
            checks.fail(ex, f"your step called `model` {len(model.calls)} time(s): {hint}")
        if len(model.calls) > 2:
            checks.fail(ex, f"your step called `model` {len(model.calls)} times: Heun needs exactly two velocities.")
        _fed_time_check(ex, model.calls[0][1], t, t_next, "the first slope")
        (x1, _), (x2, s2) = model.calls
        if not torch.allclose(x1.double(), x.double(), atol=1e-6):
            checks.fail(ex, "the first slope is the velocity at the point you start from, (x, t).")
        f = _Field()
        v, xd = f.velocity(x, t), x.double()
        h = _bcast(t_next.double() - t.double(), x)
        euler_point = xd + h * v
        s2 = torch.as_tensor(s2).double()
        if (
            tuple(s2.shape) == tuple(t.shape)
            and torch.allclose(s2, 1000 * t.double(), atol=1e-3)
            and not torch.equal(t, t_next)
        ):
            checks.fail(ex, "the second slope was taken at time t: the Euler guess x' = x + (t_next - t) v is a "
                        "point at t_next, so evaluate the velocity there, model(x', 1000 · t_next).")  # fmt: skip
        if not (tuple(s2.shape) == tuple(t.shape) and torch.allclose(s2, 1000 * t_next.double(), atol=1e-3)):
            checks.fail(ex, f"the second slope: the model was fed {_fmt(s2)}, expected 1000 · t_next = "
                        f"{_fmt(1000 * t_next)}.")  # fmt: skip
        if not torch.allclose(x2.double(), euler_point, atol=1e-5):
            if torch.allclose(x2.double(), xd, atol=1e-6):
                hint = "you evaluated it at x itself: evaluate it at the Euler guess x' = x + (t_next - t) · v_hat."
            elif torch.allclose(x2.double(), xd - h * v, atol=1e-5):
                hint = "your Euler guess steps the wrong way: dt = t_next - t is negative (time runs from 1 to 0)."
            else:
                hint = "evaluate it at the Euler guess x' = x + (t_next - t) · v_hat(x, t)."
            checks.fail(ex, f"the second slope is taken at the wrong point: {hint}")
        v2 = f.velocity(euler_point, t_next)
        expected = flow.heun_step(_Field(), x, t, t_next)
        variants = [
            (xd + h * v2, "you stepped with the second slope alone: Heun's step uses the average of the two, "
             "(v_hat(x, t) + v_hat(x', t_next)) / 2."),
            (xd + h * (v + v2), "the two slopes are summed, not averaged: divide by 2."),
            (euler_point, "you returned the Euler guess x': correct it with the average of the two slopes."),
            (xd - h * (v + v2) / 2, "the step goes the wrong way: dt = t_next - t is negative."),
            (torch.where(_bcast(t_next == 0, x), euler_point, expected.double()), LAST_STEP_HINT),
        ]  # fmt: skip
        checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5,
                            diagnose=lambda got, vs=variants: _first_match(got, vs), what="x_next")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 11.4 (sample_timesteps)
# --------------------------------------------------------------------------

TIMESTEPS = "11.4 (sample_timesteps)"


def _normal_quantile(u: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2) * torch.erfinv(2 * u - 1)


def check_sample_timesteps(fn) -> None:
    """Exercise 11.4: ``fn(n, generator, t_sampling, logit_mean, logit_std)`` -> float32 [n] training times."""
    ex = TIMESTEPS
    cases = [("uniform", 0.0, 1.0, 1000), ("logit-normal", 0.0, 1.0, 1000), ("logit-normal", -0.5, 1.5, 600)]
    for k, (kind, m, s, n) in enumerate(cases):
        seed = 1140 + k
        g = checks.seeded(seed)
        got = checks.call(ex, fn, n, g, kind, m, s)
        got = checks.expect_tensor(ex, got, "t")
        checks.expect_shape(ex, got, (n,))
        checks.expect_dtype(ex, got, torch.float32, "draw in the default dtype, float32, as the trainer does.")
        ref_g = checks.seeded(seed)
        flow = FlowMatching(t_sampling=kind, logit_mean=m, logit_std=s)
        expected = flow.sample_timesteps(n, generator=ref_g)
        u = torch.rand(n, generator=checks.seeded(seed)).double()
        z = torch.randn(n, generator=checks.seeded(seed)).double()
        gd = got.double()
        if kind == "uniform":
            variants = [
                (torch.sigmoid(z), "t_sampling='uniform' asks for t ~ U[0, 1): torch.rand, not a logit-normal draw."),
            ]
        else:
            variants = [
                (u, f"t_sampling={kind!r} asks for t = sigmoid(n) with n ~ N(logit_mean, logit_std^2): you drew "
                 "uniform t."),
                (torch.sigmoid(z), "you ignored logit_mean and logit_std: n = logit_mean + logit_std · (a standard "
                 "normal draw)."),
                (torch.sigmoid(m + s**2 * z), "logit_std is a standard deviation: multiply the standard normal by "
                 "logit_std, not by its square."),
                (torch.sigmoid(s + m * z), "logit_mean and logit_std are swapped."),
                (m + s * z, "n ~ N(m, s^2) lives on the whole real line: map it into (0, 1) with the logistic "
                 "sigmoid, t = sigmoid(n)."),
                (torch.sigmoid(m + s * _normal_quantile(u)), "right distribution from the wrong random draws: you "
                 "turned a uniform draw into a normal one. Draw the normal with torch.randn, so that your t are "
                 "the trainer's t for the same generator."),
                (1 - torch.sigmoid(m + s * z), "t = sigmoid(n), not 1 - sigmoid(n) (with logit_mean != 0 the two "
                 "differ in distribution too)."),
            ]  # fmt: skip
        hint = _first_match(gd, variants, atol=1e-6)
        if hint is None and torch.equal(g.get_state(), checks.seeded(seed).get_state()):
            hint = "you did not draw from `generator`: pass generator=generator, so that the draws are reproducible."
        if hint is None and not torch.equal(g.get_state(), ref_g.get_state()) and not checks.matches(got, expected):
            hint = (
                f"draw exactly ONE tensor of {n} numbers from `generator` (torch.rand for uniform, torch.randn "
                "for logit-normal): the trainer draws in this order, and later cells compare with it."
            )
        checks.expect_close(ex, got, expected, atol=1e-6, rtol=1e-6, diagnose=lambda _, h=hint: h, what="t")
        if not torch.equal(g.get_state(), ref_g.get_state()):
            checks.fail(ex, f"draw exactly ONE tensor of {n} numbers from `generator` and nothing more: the trainer "
                        "draws the next batch's noise from the same generator.")  # fmt: skip
    checks.passed(ex)


__all__ = ["check_interpolant", "check_euler_step", "check_heun_step", "check_sample_timesteps"]
