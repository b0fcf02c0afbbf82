"""The checks of lesson 05 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand from the papers' formulas (DDPM, Improved
DDPM), not taken from minidit, so a check that compared minidit with itself would not pass these tests.
"""

import math

import numpy as np
import pytest
import torch
from exercises import assert_fails, assert_passes, stub

from minidit.course import lesson05
from minidit.diffusion import approx_standard_normal_cdf

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


LN2 = math.log(2)


def per_image(table, t, ndim, dtype=torch.float32):
    return table[t].to(dtype).view(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------
# 5.1 (beta_schedule)
# --------------------------------------------------------------------------


def beta_schedule(name, T, scale=True, endpoint=True, s=0.008, cap=0.999, square=True, shrink=True, out="beta",
                  dtype=torch.float64, count=None):  # fmt: skip
    """The right answer; each keyword switches on one mistake."""
    count = T if count is None else count
    if name == "linear":
        k = 1000 / T if scale else 1.0
        if endpoint:
            return torch.linspace(k * 1e-4, k * 0.02, count, dtype=dtype)
        return k * 1e-4 + (k * 0.02 - k * 1e-4) * torch.arange(count, dtype=dtype) / count

    def f(u):
        c = math.cos((u + s) / ((1 + s) if shrink else 1) * math.pi / 2)
        return c * c if square else c

    if out == "abar":
        return torch.tensor([f((i + 1) / T) for i in range(T)], dtype=dtype)
    betas = [1 - f((i + 1) / T) / f(i / T) for i in range(T)]
    return torch.tensor([min(b, cap) if cap else b for b in betas], dtype=dtype)


def beta_schedule_numpy(name, T):
    """Equally right: numpy for the arithmetic, a tensor at the end."""
    if name == "linear":
        return torch.from_numpy(np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
    u = np.arange(T + 1) / T
    f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    return torch.from_numpy(np.minimum(1 - f[1:] / f[:-1], 0.999))


SCHEDULE_MISTAKES = {
    "linear ends not scaled with T": (lambda n, T: beta_schedule(n, T, scale=False), "scales both ends by 1000 / T"),
    "linear without its last end": (lambda n, T: beta_schedule(n, T, endpoint=False), "include BOTH ends"),
    "T + 1 values": (lambda n, T: beta_schedule(n, T, count=T + 1), "T values, not T + 1"),
    "float32": (lambda n, T: beta_schedule(n, T, dtype=torch.float32), "Schedules are kept in float64"),
    "float32, converted at the end": (lambda n, T: beta_schedule(n, T, dtype=torch.float32).double(),
                                      "right to float32 precision only"),
    "numpy array": (lambda n, T: beta_schedule(n, T).numpy(), "should be a torch.Tensor"),
    "cosine not clipped": (lambda n, T: beta_schedule(n, T, cap=None), "clip every beta at 0.999"),
    "cosine without the offset s": (lambda n, T: beta_schedule(n, T, s=0.0), "offset s = 0.008"),
    "cosine offset not divided by 1 + s": (lambda n, T: beta_schedule(n, T, shrink=False), "divide by (1 + s)"),
    "cosine not squared": (lambda n, T: beta_schedule(n, T, square=False), "squares the cosine"),
    "cosine returns abar": (lambda n, T: beta_schedule(n, T, out="abar"), "you returned abar_t"),
}  # fmt: skip


@pytest.mark.parametrize("fn", [beta_schedule, beta_schedule_numpy])
def test_beta_schedule_right_answers_pass(fn, capsys):
    assert_passes(lesson05.check_beta_schedule, fn, "5.1 (beta_schedule)", capsys)


def test_beta_schedule_stub_fails():
    assert_fails(lesson05.check_beta_schedule, stub, "5.1 (beta_schedule)", "not implemented yet")


@pytest.mark.parametrize("name", SCHEDULE_MISTAKES)
def test_beta_schedule_mistakes_are_named(name):
    fn, hint = SCHEDULE_MISTAKES[name]
    assert_fails(lesson05.check_beta_schedule, fn, "5.1 (beta_schedule)", hint)


# --------------------------------------------------------------------------
# 5.2 (q_sample)
# --------------------------------------------------------------------------


def q_sample(x_0, t, noise, betas, table="abar", sqrt=(True, True), swap=False, cast=True, reshape=True,
             one_minus_sqrt=False):  # fmt: skip
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    a = {"abar": abar, "alpha": alphas, "prev": torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])}[table][t]
    signal = a.sqrt() if sqrt[0] else a
    scale = (1 - a.sqrt()) if one_minus_sqrt else ((1 - a).sqrt() if sqrt[1] else 1 - a)
    if cast:
        signal, scale = signal.float(), scale.float()
    if reshape:
        signal, scale = signal.view(-1, *([1] * (x_0.ndim - 1))), scale.view(-1, *([1] * (x_0.ndim - 1)))
    if swap:
        return signal * noise + scale * x_0
    return signal * x_0 + scale * noise


def q_sample_in_place(x_0, t, noise, betas):
    return x_0.mul_(1).copy_(q_sample(x_0, t, noise, betas))


Q_MISTAKES = {
    "no square roots": (lambda *a: q_sample(*a, sqrt=(False, False)), "no square roots"),
    "no square root on the noise": (lambda *a: q_sample(*a, sqrt=(True, False)), "noise coefficient needs a square"),
    "alpha_t instead of abar_t": (lambda *a: q_sample(*a, table="alpha"), "you used alpha_t"),
    "abar_{t-1}": (lambda *a: q_sample(*a, table="prev"), "off by one in t"),
    "x_0 and noise swapped": (lambda *a: q_sample(*a, swap=True), "x_0 and the noise are swapped"),
    "1 - sqrt(abar)": (lambda *a: q_sample(*a, one_minus_sqrt=True), "not 1 - sqrt(abar_t)"),
    "float64 result": (lambda *a: q_sample(*a, cast=False), "cast each per-step coefficient"),
    "coefficients broadcast on the last axis": (lambda *a: q_sample(*a, reshape=False),
                                                "broadcast against the LAST axis"),
    "numpy array": (lambda *a: q_sample(*a).numpy(), "should be a torch.Tensor"),
    "in place": (q_sample_in_place, "changed one of its inputs in place"),
}  # fmt: skip


def test_q_sample_right_answer_passes(capsys):
    assert_passes(lesson05.check_q_sample, q_sample, "5.2 (q_sample)", capsys)


def test_q_sample_stub_fails():
    assert_fails(lesson05.check_q_sample, stub, "5.2 (q_sample)", "not implemented yet")


@pytest.mark.parametrize("name", Q_MISTAKES)
def test_q_sample_mistakes_are_named(name):
    fn, hint = Q_MISTAKES[name]
    assert_fails(lesson05.check_q_sample, fn, "5.2 (q_sample)", hint)


# --------------------------------------------------------------------------
# 5.3 (posterior_coefficients)
# --------------------------------------------------------------------------


def posterior_coefficients(
    betas,
    swap=False,
    prev0=0.0,
    coef2_sqrt=True,
    coef1_abar_t=False,
    swap_coefs=False,
    clip="beta_tilde_1",
    variance_is_beta=False,
    log=True,
    dtype=torch.float64,
    count=4,
):
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.full((1,), 1.0 - prev0, dtype=abar.dtype), abar[:-1]])
    cur = abar
    if swap:
        prev, cur = cur, prev
    coef1 = betas * (abar if coef1_abar_t else prev).sqrt() / (1 - cur)
    coef2 = (1 - prev) * (alphas.sqrt() if coef2_sqrt else alphas) / (1 - cur)
    var = betas.clone() if variance_is_beta else betas * (1 - prev) / (1 - cur)
    clipped = {"beta_tilde_1": torch.cat([var[1:2], var[1:]]), "none": var,
               "beta_0": torch.cat([betas[:1], var[1:]])}[clip]  # fmt: skip
    log_var = torch.log(clipped) if log else clipped
    if swap_coefs:
        coef1, coef2 = coef2, coef1
    return tuple(x.to(dtype) for x in (coef1, coef2, var, log_var))[:count]


def posterior_by_precision(betas):
    """Equally right, written as DDPM derives it: precisions add, the mean is precision-weighted."""
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    var = torch.zeros_like(betas)
    var[1:] = 1 / (alphas[1:] / betas[1:] + 1 / (1 - prev[1:]))  # t = 0: the prior has variance 0
    coef1 = torch.where(prev < 1, var * prev.sqrt() / (1 - prev).clamp(min=1e-300), torch.ones_like(var))
    coef2 = var * alphas.sqrt() / betas
    return coef1, coef2, var, torch.log(torch.cat([var[1:2], var[1:]]))


POSTERIOR_MISTAKES = {
    "abar_t and abar_{t-1} swapped": (lambda b: posterior_coefficients(b, swap=True), "are swapped"),
    "abar_{-1} = 0": (lambda b: posterior_coefficients(b, prev0=1.0), "not 0: prepend 1"),
    "coef2 with alpha_t": (lambda b: posterior_coefficients(b, coef2_sqrt=False), "sqrt(alpha_t), not alpha_t"),
    "coef1 with sqrt(abar_t)": (lambda b: posterior_coefficients(b, coef1_abar_t=True),
                                "coef1 uses sqrt(abar_{t-1})"),
    "coef1 and coef2 swapped": (lambda b: posterior_coefficients(b, swap_coefs=True), "coef1 and coef2 are swapped"),
    "log-variance not clipped": (lambda b: posterior_coefficients(b, clip="none"), "log beta~_0 = log 0 = -inf"),
    "log beta_0 at t = 0": (lambda b: posterior_coefficients(b, clip="beta_0"), "not log beta_0"),
    "variance = beta_t": (lambda b: posterior_coefficients(b, variance_is_beta=True), "that is beta_t"),
    "variance instead of log-variance": (lambda b: posterior_coefficients(b, log=False), "LOG of the clipped"),
    "float32 tables": (lambda b: posterior_coefficients(b, dtype=torch.float32), "the tables stay float64"),
    "computed in float32": (lambda b: posterior_coefficients(b.float(), dtype=torch.float64),
                            "right to float32 precision only"),
    "three tables": (lambda b: posterior_coefficients(b, count=3), "a tuple of four tables"),
}  # fmt: skip


@pytest.mark.parametrize("fn", [posterior_coefficients, posterior_by_precision])
def test_posterior_coefficients_right_answers_pass(fn, capsys):
    assert_passes(lesson05.check_posterior_coefficients, fn, "5.3 (posterior_coefficients)", capsys)


def test_posterior_coefficients_stub_fails():
    assert_fails(lesson05.check_posterior_coefficients, stub, "5.3 (posterior_coefficients)", "not implemented yet")


@pytest.mark.parametrize("name", POSTERIOR_MISTAKES)
def test_posterior_coefficients_mistakes_are_named(name):
    fn, hint = POSTERIOR_MISTAKES[name]
    assert_fails(lesson05.check_posterior_coefficients, fn, "5.3 (posterior_coefficients)", hint)


def test_posterior_is_bayes_rule():
    """The check's reference is the posterior by Bayes' rule: brute force on a grid, one pixel."""
    betas = beta_schedule("linear", 1000)
    coef1, coef2, var, _ = posterior_coefficients(betas)
    abar = torch.cumprod(1 - betas, 0)
    t, x0, x_t = 30, 0.4, 0.1
    grid = torch.linspace(-2, 2, 200001, dtype=torch.float64)
    log_p = -0.5 * (x_t - (1 - betas[t]).sqrt() * grid) ** 2 / betas[t]
    log_p = log_p - 0.5 * (grid - abar[t - 1].sqrt() * x0) ** 2 / (1 - abar[t - 1])
    p = torch.exp(log_p - log_p.max())
    p = p / p.sum()
    mean = (p * grid).sum()
    torch.testing.assert_close(mean, coef1[t] * x0 + coef2[t] * x_t, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((p * (grid - mean) ** 2).sum(), var[t], rtol=1e-4, atol=0)


# --------------------------------------------------------------------------
# 5.4 (model_log_variance)
# --------------------------------------------------------------------------


def model_log_variance(v, t, betas, frac_is_v=False, swap=False, of_variances=False, clip="beta_tilde_1",
                       out="log_var", cast=True):  # fmt: skip
    log_tilde = posterior_coefficients(betas, clip=clip)[3]
    dtype = torch.float32 if cast else torch.float64
    hi, lo = per_image(torch.log(betas), t, v.ndim, dtype), per_image(log_tilde, t, v.ndim, dtype)
    frac = v if frac_is_v else (v + 1) / 2
    if swap:
        hi, lo = lo, hi
    log_var = torch.log(frac * hi.exp() + (1 - frac) * lo.exp()) if of_variances else frac * hi + (1 - frac) * lo
    return {"log_var": log_var, "log_sigma": 0.5 * log_var, "var": log_var.exp()}[out]


LOG_VARIANCE_MISTAKES = {
    "frac = v": (lambda *a: model_log_variance(*a, frac_is_v=True), "frac = (v + 1) / 2"),
    "ends swapped": (lambda *a: model_log_variance(*a, swap=True), "the ends are swapped"),
    "variances interpolated": (lambda *a: model_log_variance(*a, of_variances=True), "interpolated the variances"),
    "unclipped log beta~": (lambda *a: model_log_variance(*a, clip="none"), "is not finite"),
    "float64 result": (lambda *a: model_log_variance(*a, cast=False), "cast each per-step coefficient"),
    "log sigma returned": (lambda *a: model_log_variance(*a, out="log_sigma"), "log sigma (half"),
    "variance returned": (lambda *a: model_log_variance(*a, out="var"), "you returned a variance"),
}  # fmt: skip


def test_model_log_variance_right_answer_passes(capsys):
    assert_passes(lesson05.check_model_log_variance, model_log_variance, "5.4 (model_log_variance)", capsys)


def test_model_log_variance_stub_fails():
    assert_fails(lesson05.check_model_log_variance, stub, "5.4 (model_log_variance)", "not implemented yet")


@pytest.mark.parametrize("name", LOG_VARIANCE_MISTAKES)
def test_model_log_variance_mistakes_are_named(name):
    fn, hint = LOG_VARIANCE_MISTAKES[name]
    assert_fails(lesson05.check_model_log_variance, fn, "5.4 (model_log_variance)", hint)


# --------------------------------------------------------------------------
# 5.5 (normal_kl)
# --------------------------------------------------------------------------


def normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def normal_kl_with_sigmas(m1, lv1, m2, lv2):
    """Equally right (here): the textbook form with standard deviations."""
    s1, s2 = torch.exp(0.5 * lv1), torch.exp(0.5 * lv2)
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


KL_MISTAKES = {
    "arguments swapped": (lambda m1, lv1, m2, lv2: normal_kl(m2, lv2, m1, lv1), "KL(p2 || p1)"),
    "in bits": (lambda *a: normal_kl(*a) / math.log(2), "you converted to bits"),
    "missing 1/2": (lambda *a: 2 * normal_kl(*a), "factor 1/2"),
    "missing -1": (lambda *a: normal_kl(*a) + 0.5, "left out the -1"),
    "log-variances taken as log-stds": (lambda m1, lv1, m2, lv2: normal_kl(m1, 2 * lv1, m2, 2 * lv2),
                                        "log standard deviations"),
    "sign of the log term": (lambda m1, lv1, m2, lv2: normal_kl(m1, lv1, m2, lv2) - (lv2 - lv1),
                             "the sign of the log term"),
    "mean term over the first variance": (
        lambda m1, lv1, m2, lv2: 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv1)),
        "SECOND variance"),
    "summed": (lambda *a: normal_kl(*a).sum(), "elementwise"),
}  # fmt: skip


@pytest.mark.parametrize("fn", [normal_kl, normal_kl_with_sigmas])
def test_normal_kl_right_answers_pass(fn, capsys):
    assert_passes(lesson05.check_normal_kl, fn, "5.5 (normal_kl)", capsys)


def test_normal_kl_stub_fails():
    assert_fails(lesson05.check_normal_kl, stub, "5.5 (normal_kl)", "not implemented yet")


@pytest.mark.parametrize("name", KL_MISTAKES)
def test_normal_kl_mistakes_are_named(name):
    fn, hint = KL_MISTAKES[name]
    assert_fails(lesson05.check_normal_kl, fn, "5.5 (normal_kl)", hint)


def test_normal_kl_against_monte_carlo():
    """The formula the check compares with is the KL: a Monte Carlo estimate in float64 agrees."""
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(2_000_000, generator=g, dtype=torch.float64)

    def log_density(x, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))

    estimate = (log_density(x, m1, lv1) - log_density(x, m2, lv2)).mean()
    exact = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
    assert abs(estimate - exact) < 5e-3


# --------------------------------------------------------------------------
# 5.6 (discretized_gaussian_log_likelihood)
# --------------------------------------------------------------------------


def decoder_ll(x, means, log_scales, half=1 / 255, edges=True, logvar=False, cdf=approx_standard_normal_cdf,
               clamp=True, sign=1.0):  # fmt: skip
    inv = torch.exp(-(0.5 if logvar else 1.0) * log_scales)
    upper, lower = cdf(inv * (x - means + half)), cdf(inv * (x - means - half))

    def log(p):
        return torch.log(p.clamp(min=1e-12)) if clamp else torch.log(p)

    ll = log(upper - lower)
    if edges:
        ll = torch.where(x < -0.999, log(upper), torch.where(x > 0.999, log(1 - lower), ll))
    return sign * ll


DECODER_MISTAKES = {
    "bins 4/255 wide": (lambda *a: decoder_ll(*a, half=2 / 255), "not x ± 2/255"),
    "bins 1/255 wide": (lambda *a: decoder_ll(*a, half=0.5 / 255), "not x ± 0.5/255"),
    "end bins not open": (lambda *a: decoder_ll(*a, edges=False), "the end bins"),
    "log_scales taken as a log-variance": (lambda *a: decoder_ll(*a, logvar=True), "not a log-variance"),
    "no clamp before the log": (lambda *a: decoder_ll(*a, clamp=False), "clamp the probability at 1e-12"),
    "negative log-likelihood": (lambda *a: decoder_ll(*a, sign=-1.0), "the sign"),
    "exact normal CDF": (lambda *a: decoder_ll(*a, cdf=torch.special.ndtr), "exact normal CDF"),
}  # fmt: skip


def test_decoder_right_answer_passes(capsys):
    assert_passes(lesson05.check_discretized_gaussian_log_likelihood, decoder_ll,
                  "5.6 (discretized_gaussian_log_likelihood)", capsys)  # fmt: skip


def test_decoder_stub_fails():
    assert_fails(lesson05.check_discretized_gaussian_log_likelihood, stub,
                 "5.6 (discretized_gaussian_log_likelihood)", "not implemented yet")  # fmt: skip


@pytest.mark.parametrize("name", DECODER_MISTAKES)
def test_decoder_mistakes_are_named(name):
    fn, hint = DECODER_MISTAKES[name]
    assert_fails(lesson05.check_discretized_gaussian_log_likelihood, fn,
                 "5.6 (discretized_gaussian_log_likelihood)", hint)  # fmt: skip


def test_decoder_probabilities_add_up_to_one():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mu, sigma in [(0.0, 0.3), (0.95, 0.05), (-1.2, 0.5)]:
        p = decoder_ll(levels, torch.tensor(mu), torch.tensor(math.log(sigma))).exp()
        assert abs(p.sum().item() - 1) < 1e-9


# --------------------------------------------------------------------------
# 5.7 (training_losses)
# --------------------------------------------------------------------------


def training_losses(model, x_0, t, noise, betas, detach=True, vb_unit=LN2, decoder="t == 0", kl_order="qp",
                    vb_reduce="mean", mse_reduce="mean", target="noise", vb_weight=1.0, vb_scale=1.0, cast=True,
                    model_input="x_t", calls=1, detach_v=False, batch_mean=False):  # fmt: skip
    """The hybrid loss written from the papers' formulas; each keyword switches on one mistake."""
    C, dims = x_0.shape[1], list(range(1, x_0.ndim))
    dtype = torch.float32 if cast else torch.float64

    def at(table):
        return per_image(table, t, x_0.ndim, dtype)

    x_t = q_sample(x_0, t, noise, betas)
    for _ in range(calls):
        out = model(x_t if model_input == "x_t" else x_0, t)
    eps, v = torch.split(out, C, dim=1)
    abar = torch.cumprod(1 - betas, 0)
    coef1, coef2, _, log_tilde = posterior_coefficients(betas)
    true_mean, true_lv = at(coef1) * x_0 + at(coef2) * x_t, at(log_tilde)
    eps_vb = eps.detach() if detach else eps
    pred_x0 = (x_t - at((1 - abar).sqrt()) * eps_vb) / at(abar.sqrt())
    model_mean = at(coef1) * pred_x0 + at(coef2) * x_t
    model_lv = model_log_variance(v.detach() if detach_v else v, t, betas, cast=cast)
    reduce_vb = (lambda x: x.mean(dims)) if vb_reduce == "mean" else (lambda x: x.sum(dims))
    kl = (
        normal_kl(true_mean, true_lv, model_mean, model_lv)
        if kl_order == "qp"
        else normal_kl(model_mean, model_lv, true_mean, true_lv)
    )
    kl = reduce_vb(kl) / vb_unit
    nll = reduce_vb(-decoder_ll(x_0, model_mean, 0.5 * model_lv)) / vb_unit
    vb = {"t == 0": torch.where(t == 0, nll, kl), "never": kl, "always": nll, "swapped": torch.where(t == 0, kl, nll),
          "zero": torch.zeros_like(kl)}[decoder] * vb_scale  # fmt: skip
    err = (noise if target == "noise" else x_0) - eps
    mse = (err**2).mean(dims) if mse_reduce == "mean" else (err**2).sum(dims)
    losses = {"loss": mse + vb_weight * vb, "mse": mse, "vb": vb}
    return {k: value.mean() for k, value in losses.items()} if batch_mean else losses


L = "5.7 (training_losses)"
LOSS_MISTAKES = {
    "mean not detached in the VB term": (lambda *a: training_losses(*a, detach=False), "sends gradient into eps"),
    "v detached too": (lambda *a: training_losses(*a, detach_v=True), "carries no gradient"),
    "vb in nats": (lambda *a: training_losses(*a, vb_unit=1.0), "vb is in nats"),
    "KL at t = 0": (lambda *a: training_losses(*a, decoder="never"), "decoder's negative log-likelihood"),
    "decoder NLL at every t": (lambda *a: training_losses(*a, decoder="always"), "used only at t = 0"),
    "decoder and KL swapped": (lambda *a: training_losses(*a, decoder="swapped"), "the two cases are swapped"),
    "KL arguments swapped": (lambda *a: training_losses(*a, kl_order="pq"), "the KL's arguments are swapped"),
    "vb summed over dimensions": (lambda *a: training_losses(*a, vb_reduce="sum"), "summed the VB term"),
    "the blog's loss: vb dropped": (lambda *a: training_losses(*a, decoder="zero"), "your vb is 0"),
    "loss = mse alone": (lambda *a: training_losses(*a, vb_weight=0.0), "your loss is the MSE alone"),
    "lambda = 0.001": (lambda *a: training_losses(*a, vb_weight=0.001), "no λ = 0.001"),
    "mse summed over dimensions": (lambda *a: training_losses(*a, mse_reduce="sum"), "summed the squared error"),
    "mse against x_0": (lambda *a: training_losses(*a, target="x_0"), "the target is the noise"),
    "float64 losses": (lambda *a: training_losses(*a, cast=False), "cast each per-step coefficient to float32"),
    "batch means": (lambda *a: training_losses(*a, batch_mean=True), "is per sample, [B]"),
    "model called on x_0": (lambda *a: training_losses(*a, model_input="x_0"), "it was given x_0"),
    "noise of its own": (lambda m, x, t, noise, b: training_losses(m, x, t, torch.randn_like(noise), b),
                         "draw none of your own"),
    "model called twice": (lambda *a: training_losses(*a, calls=2), "called the model 2 times"),
    "a tuple instead of a dict": (lambda *a: tuple(training_losses(*a).values()), "return a dict"),
}  # fmt: skip


def test_training_losses_right_answer_passes(capsys):
    assert_passes(lesson05.check_training_losses, training_losses, L, capsys)


def test_training_losses_stub_fails():
    assert_fails(lesson05.check_training_losses, stub, L, "not implemented yet")


def test_training_losses_names_an_unfinished_earlier_exercise():
    def needs_q_sample(model, x_0, t, noise, betas):
        raise NotImplementedError("Exercise 5.2 (q_sample): replace this line with your code")

    assert_fails(lesson05.check_training_losses, needs_q_sample, L, "needs Exercise 5.2 (q_sample) first")


@pytest.mark.parametrize("name", LOSS_MISTAKES)
def test_training_losses_mistakes_are_named(name):
    fn, hint = LOSS_MISTAKES[name]
    assert_fails(lesson05.check_training_losses, fn, L, hint)


def test_vb_is_zero_for_the_true_posterior():
    """The VB term the check compares with is a real KL: zero when the model predicts the true noise and the
    posterior variance (v = -1), positive otherwise."""
    betas = beta_schedule("linear", 1000)
    x_0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t, noise = torch.tensor([1, 10]), torch.randn(2, 3, 4, 4)

    def oracle(x, t, v=-1.0):
        return torch.cat([noise, torch.full_like(noise, v)], dim=1)

    assert training_losses(oracle, x_0, t, noise, betas)["vb"].abs().max() < 1e-5
    assert (training_losses(lambda x, t: oracle(x, t, 1.0), x_0, t, noise, betas)["vb"] > 1e-4).all()


# --------------------------------------------------------------------------
# All checks
# --------------------------------------------------------------------------

RIGHT = {
    lesson05.check_beta_schedule: beta_schedule,
    lesson05.check_q_sample: q_sample,
    lesson05.check_posterior_coefficients: posterior_coefficients,
    lesson05.check_model_log_variance: model_log_variance,
    lesson05.check_normal_kl: normal_kl,
    lesson05.check_discretized_gaussian_log_likelihood: decoder_ll,
    lesson05.check_training_losses: training_losses,
}


def test_checks_leave_the_global_rng_alone():
    for check, fn in RIGHT.items():
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        check(fn)
        assert torch.equal(torch.rand(3), expected), check.__name__


def _as_list(mistakes):
    return [(name, fn, (hint,)) for name, (fn, hint) in mistakes.items()]


MUTANTS = {  # exercise -> [(mistake, function, hint keywords)], for the course's mutant table
    "5.1 (beta_schedule)": _as_list(SCHEDULE_MISTAKES),
    "5.2 (q_sample)": _as_list(Q_MISTAKES),
    "5.3 (posterior_coefficients)": _as_list(POSTERIOR_MISTAKES),
    "5.4 (model_log_variance)": _as_list(LOG_VARIANCE_MISTAKES),
    "5.5 (normal_kl)": _as_list(KL_MISTAKES),
    "5.6 (discretized_gaussian_log_likelihood)": _as_list(DECODER_MISTAKES),
    "5.7 (training_losses)": _as_list(LOSS_MISTAKES),
}
CHECKS = {
    "5.1 (beta_schedule)": lesson05.check_beta_schedule,
    "5.2 (q_sample)": lesson05.check_q_sample,
    "5.3 (posterior_coefficients)": lesson05.check_posterior_coefficients,
    "5.4 (model_log_variance)": lesson05.check_model_log_variance,
    "5.5 (normal_kl)": lesson05.check_normal_kl,
    "5.6 (discretized_gaussian_log_likelihood)": lesson05.check_discretized_gaussian_log_likelihood,
    "5.7 (training_losses)": lesson05.check_training_losses,
}
