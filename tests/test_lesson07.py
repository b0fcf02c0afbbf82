"""The checks of lesson 07 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand from the papers' formulas (DDPM Alg. 2,
Improved DDPM §3.1/§4, DDIM eq. 12, CFG eq. 6), not taken from minidit, so a check that compared
minidit with itself would not pass these tests.
"""

import numpy as np
import pytest
import torch
from exercises import assert_fails, assert_passes, stub

from minidit.course import lesson07


def per_image(table, t, ndim, dtype=torch.float32):
    return table[t].to(dtype).view(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------
# 7.1 (p_sample)
# --------------------------------------------------------------------------

P_SAMPLE = "7.1 (p_sample)"


def p_sample(model, x, t, diffusion, generator, clip_denoised=False, noise_at_0=False, sigma="learned",
             half=True, x0_form="right", feed="map", draw="one", dtype=torch.float32, swap_coefs=False,
             frac_is_v=False, clip=True):  # fmt: skip
    """The right answer (the textbook form); each keyword switches on one mistake."""
    n, C = x.ndim, x.shape[1]

    def at(table):
        return per_image(table, t, n, torch.float64)

    t_model = {"map": diffusion.timestep_map[t], "respaced": t}[feed]
    eps, v = model(x, t_model).double().split(C, dim=1)
    xd = x.double()
    betas = diffusion.betas
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    a_t, ap_t, b_t = at(abar), at(abar_prev), at(betas)
    if x0_form == "right":
        x0 = (xd - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif x0_form == "no sqrt":
        x0 = (xd - (1 - a_t).sqrt() * eps) / a_t
    else:  # the forward formula
        x0 = a_t.sqrt() * xd - (1 - a_t).sqrt() * eps
    if clip_denoised and clip:
        x0 = x0.clamp(-1, 1)
    c1, c2 = b_t * ap_t.sqrt() / (1 - a_t), (1 - ap_t) * (1 - b_t).sqrt() / (1 - a_t)
    if swap_coefs:
        c1, c2 = c2, c1
    mean = c1 * x0 + c2 * xd
    tilde = betas * (1 - abar_prev) / (1 - abar)
    log_tilde = torch.log(torch.cat([tilde[1:2], tilde[1:]]))
    frac = v if frac_is_v else (v + 1) / 2
    log_var = frac * at(torch.log(betas)) + (1 - frac) * at(log_tilde)
    std = {"learned": (0.5 if half else 1.0) * log_var, "beta": 0.5 * at(torch.log(betas)),
           "tilde": 0.5 * at(log_tilde)}[sigma].exp()  # fmt: skip
    if draw == "one":
        z = torch.randn(x.shape, generator=generator)
    elif draw == "global":
        z = torch.randn(x.shape)
    else:  # one draw per image
        z = torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(len(x))])
    mask = torch.ones_like(t) if noise_at_0 else (t != 0)
    out = mean + mask.double().view(-1, *([1] * (n - 1))) * std * z.double()
    return out.to(dtype)


def p_sample_numpy(model, x, t, diffusion, generator, clip_denoised=False):
    return p_sample(model, x, t, diffusion, generator, clip_denoised).numpy()


def p_sample_twice(model, x, t, diffusion, generator, clip_denoised=False):
    p_sample(lambda *a: model(*a), x, t, diffusion, generator, clip_denoised)
    return p_sample(model, x, t, diffusion, generator, clip_denoised)


P_SAMPLE_MISTAKES = {
    "noise at t = 0": (dict(noise_at_0=True), "at t = 0 the step returns the mean"),
    "beta_t as the variance": (dict(sigma="beta"), "sqrt(beta_t), the fixed variance"),
    "v ignored": (dict(sigma="tilde"), "ignores v"),
    "exp(log var)": (dict(half=False), "exp(0.5 · log sigma^2)"),
    "frac = v": (dict(frac_is_v=True), "you used v itself"),
    "x0 from the forward formula": (dict(x0_form="forward"), "solve x_t = sqrt(abar) x_0"),
    "x0 divided by abar": (dict(x0_form="no sqrt"), "divides by abar_t"),
    "coefficients swapped": (dict(swap_coefs=True), "coef1 multiplies x0_hat"),
    "clip ignored": (dict(clip=False), "clamp x0_hat to [-1, 1]"),
    "respaced index fed to the model": (dict(feed="respaced"), "must see timestep_map[t]"),
    "global RNG": (dict(draw="global"), "you did not draw from `generator`"),
    "one draw per image": (dict(draw="per image"), "exactly ONE tensor of x's shape"),
    "float64 result": (dict(dtype=torch.float64), "cast each per-step coefficient to float32"),
}


def test_p_sample_right_answer_passes(capsys):
    assert_passes(lesson07.check_p_sample, p_sample, P_SAMPLE, capsys)


def test_p_sample_stub_fails():
    assert_fails(lesson07.check_p_sample, stub, P_SAMPLE, "not implemented yet")


@pytest.mark.parametrize("name", P_SAMPLE_MISTAKES)
def test_p_sample_mistakes_are_named(name):
    kwargs, hint = P_SAMPLE_MISTAKES[name]
    assert_fails(lesson07.check_p_sample, lambda *a: p_sample(*a, **kwargs), P_SAMPLE, hint)


def test_p_sample_numpy_and_double_calls_are_rejected():
    assert_fails(lesson07.check_p_sample, p_sample_numpy, P_SAMPLE, "should be a torch.Tensor")
    assert_fails(lesson07.check_p_sample, p_sample_twice, P_SAMPLE, "called `model` 2 times")


# --------------------------------------------------------------------------
# 7.2 (respace_betas)
# --------------------------------------------------------------------------

RESPACE = "7.2 (respace_betas)"


def respace_betas(betas, use_timesteps, subset=False, first="right", invert=False, map_="right", sort=True,
                  dtype=torch.float64):  # fmt: skip
    keep = sorted(set(use_timesteps)) if sort else list(dict.fromkeys(use_timesteps))
    abar = np.cumprod(1 - betas.numpy())
    out, last = [], 1.0
    for k, s in enumerate(keep):
        if k == 0 and first == "beta":
            out.append(float(betas[s]))
        elif k == 0 and first == "abar_0":
            out.append(1 - abar[s] / abar[0])
        elif invert:
            out.append(1 - last / abar[s])
        else:
            out.append(1 - abar[s] / last)
        last = abar[s]
    new = betas[keep] if subset else torch.tensor(out, dtype=dtype)
    timestep_map = torch.arange(len(keep)) if map_ == "range" else torch.tensor(keep)
    return new, timestep_map


RESPACE_MISTAKES = {
    "betas subset": (dict(subset=True), "you kept the original betas"),
    "first beta = beta_{t_0}": (dict(first="beta"), "it is 1 - abar_{t_0}, not beta_{t_0}"),
    "first beta from abar_0": (dict(first="abar_0"), "not from abar_0"),
    "ratio inverted": (dict(invert=True), "upside down"),
    "map 0..S-1": (dict(map_="range"), "not 0..S-1"),
    "unsorted": (dict(sort=False), "increasing order"),
    "float32 betas": (dict(dtype=torch.float32), "float64"),
}


def test_respace_betas_right_answer_passes(capsys):
    assert_passes(lesson07.check_respace_betas, respace_betas, RESPACE, capsys)


def test_respace_betas_stub_fails():
    assert_fails(lesson07.check_respace_betas, stub, RESPACE, "not implemented yet")


@pytest.mark.parametrize("name", RESPACE_MISTAKES)
def test_respace_betas_mistakes_are_named(name):
    kwargs, hint = RESPACE_MISTAKES[name]
    assert_fails(lesson07.check_respace_betas, lambda *a: respace_betas(*a, **kwargs), RESPACE, hint)


def test_respace_betas_returns_a_pair():
    assert_fails(lesson07.check_respace_betas, lambda *a: respace_betas(*a)[0], RESPACE, "return a pair")


# --------------------------------------------------------------------------
# 7.3 (ddim_step)
# --------------------------------------------------------------------------

DDIM = "7.3 (ddim_step)"


def ddim_step(model, x, t, diffusion, prev="right", x0_form="right", noise=False, feed="map", dir_sqrt=True):
    n, C = x.ndim, x.shape[1]
    eps = model(x, {"map": diffusion.timestep_map[t], "respaced": t}[feed])[:, :C].double()
    abar = torch.cumprod(1 - diffusion.betas, 0)
    a_t = per_image(abar, t, n, torch.float64)
    if prev == "right":
        a_prev = per_image(torch.cat([abar.new_ones(1), abar[:-1]]), t, n, torch.float64)
    elif prev == "same":
        a_prev = a_t
    else:  # abar[t - 1], which wraps at t = 0
        a_prev = per_image(abar, t - 1, n, torch.float64)
    xd = x.double()
    x0 = (xd - (1 - a_t).sqrt() * eps) / a_t.sqrt() if x0_form == "right" else a_t.sqrt() * xd - (1 - a_t).sqrt() * eps
    direction = (1 - a_prev).sqrt() if dir_sqrt else 1 - a_prev
    out = a_prev.sqrt() * x0 + direction * eps
    if noise:
        out = out + 0.1 * torch.randn(x.shape)
    return out.float()


DDIM_MISTAKES = {
    "abar_t for abar_{t-1}": (dict(prev="same"), "lands on abar_{t-1}"),
    "abar[t - 1] wraps at t = 0": (dict(prev="wrap"), "alphas_cumprod[-1]"),
    "x0 from the forward formula": (dict(x0_form="forward"), "solve x_t = sqrt(abar_t) x_0"),
    "eta > 0 noise": (dict(noise=True), "draws no noise"),
    "respaced index fed to the model": (dict(feed="respaced"), "must see timestep_map[t]"),
    "direction without sqrt": (dict(dir_sqrt=False), "scaled by sqrt(1 - abar_{t-1})"),
}


def test_ddim_step_right_answer_passes(capsys):
    assert_passes(lesson07.check_ddim_step, ddim_step, DDIM, capsys)


def test_ddim_step_stub_fails():
    assert_fails(lesson07.check_ddim_step, stub, DDIM, "not implemented yet")


@pytest.mark.parametrize("name", DDIM_MISTAKES)
def test_ddim_step_mistakes_are_named(name):
    kwargs, hint = DDIM_MISTAKES[name]
    assert_fails(lesson07.check_ddim_step, lambda *a: ddim_step(*a, **kwargs), DDIM, hint)


# --------------------------------------------------------------------------
# 7.4 (guide)
# --------------------------------------------------------------------------

GUIDE = "7.4 (guide)"


def guide(out, s, guided_channels=3, form="right", channels=None, halves=2, keep_second=False):
    B, C2 = out.shape[0] // 2, out.shape[1]
    n = channels if channels is not None else (C2 // 2 if guided_channels is None else guided_channels)
    if channels == "all":
        n = C2
    cond, uncond = out[:B, :n], out[B:, :n]
    guided = {"right": uncond + s * (cond - uncond), "plain": uncond + s * cond,
              "swapped": cond + s * (uncond - cond)}[form]  # fmt: skip
    first = torch.cat([guided, out[:B, n:]], dim=1)
    second = out[B:] if keep_second else torch.cat([guided, out[B:, n:]], dim=1)
    return first if halves == 1 else torch.cat([first, second])


def guide_all_eps(out, s, guided_channels=3):
    """Ignores guided_channels: always all C eps channels."""
    return guide(out, s, None)


GUIDE_MISTAKES = {
    "uncond + s cond": (dict(form="plain"), "you left out"),
    "cond/uncond swapped": (dict(form="swapped"), "are swapped"),
    "variance channels guided": (dict(channels="all"), "guided the variance channels"),
    "second half unguided": (dict(keep_second=True), "the second half must carry the guided eps"),
    "first half only": (dict(halves=1), "return both halves"),
}


def test_guide_right_answer_passes(capsys):
    assert_passes(lesson07.check_guide, guide, GUIDE, capsys)


def test_guide_stub_fails():
    assert_fails(lesson07.check_guide, stub, GUIDE, "not implemented yet")


@pytest.mark.parametrize("name", GUIDE_MISTAKES)
def test_guide_mistakes_are_named(name):
    kwargs, hint = GUIDE_MISTAKES[name]
    assert_fails(lesson07.check_guide, lambda *a: guide(*a, **kwargs), GUIDE, hint)


def test_guide_channel_count_mistakes_are_named():
    assert_fails(lesson07.check_guide, guide_all_eps, GUIDE, "you guided all 4 eps channels")
    assert_fails(lesson07.check_guide, lambda o, s, g=3: guide(o, s, 3), GUIDE, "you guided 3")


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for check, fn in [(lesson07.check_p_sample, p_sample), (lesson07.check_respace_betas, respace_betas),
                      (lesson07.check_ddim_step, ddim_step), (lesson07.check_guide, guide)]:  # fmt: skip
        check(fn)
    assert torch.equal(torch.get_rng_state(), before)
