"""Checks for lesson 05: the forward process and the training objective.

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs, compares it with the
reference in ``minidit.diffusion`` (``get_named_beta_schedule``, ``GaussianDiffusion``, ``normal_kl``,
``discretized_gaussian_log_likelihood``), prints one line on success, or raises ``AssertionError``
naming the likely mistake (found by comparing with known wrong variants, computed here in float64).

Schedules and their tables are float64 (``betas`` is a float64 tensor [T]); anything that meets an
image is float32, as in the reference, which casts each per-step coefficient to float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from minidit import diffusion as _diffusion
from minidit.diffusion import GaussianDiffusion

from . import checks

LN2 = math.log(2.0)


def _reference(betas: torch.Tensor) -> GaussianDiffusion:
    return GaussianDiffusion(betas.numpy(), learn_sigma=True)


def _tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """abar, abar_prev, alphas in float64, computed here (not by the reference) for the wrong variants."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    return {"alphas": alphas, "abar": abar, "abar_prev": torch.cat([abar.new_ones(1), abar[:-1]])}


def _per_sample(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] as float64 [B, 1, ..., 1]."""
    return table[t].double().view(-1, *([1] * (ndim - 1)))


def _diagnose_with(variants):
    """A ``diagnose`` for ``checks.expect_close``: the hint of the first wrong variant ``got`` equals."""

    def diagnose(got, variants=variants):
        for variant, hint, atol in variants:
            if checks.matches(got, variant, atol=atol):
                return hint
        return None

    return diagnose


def _unchanged(ex: str, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    if any(not torch.equal(a, b) for a, b in zip(before, after)):
        checks.fail(ex, "your function changed one of its inputs in place: compute new tensors instead.")


FLOAT32_TABLES = (
    "your values are right to float32 precision only: compute the tables in float64 throughout (the betas' dtype); "
    "converting a float32 result at the end does not bring the lost digits back."
)
FLOAT32_HINT = (
    "The schedule tables are float64; cast each per-step coefficient to the images' dtype (float32) before it "
    "meets them, as the reference does: a float64 result would not go through the DiT's float32 layers."
)

# --------------------------------------------------------------------------
# Exercise 5.1 (beta_schedule)
# --------------------------------------------------------------------------

SCHEDULE = "5.1 (beta_schedule)"


def _linear(T: int, scale: bool = True, endpoint: bool = True) -> torch.Tensor:
    s = 1000 / T if scale else 1.0
    if endpoint:
        return torch.from_numpy(np.linspace(s * 1e-4, s * 0.02, T, dtype=np.float64))
    return s * 1e-4 + (s * 0.02 - s * 1e-4) * torch.arange(T, dtype=torch.float64) / T


def _cosine(T: int, s: float = 0.008, square: bool = True, cap: float | None = 0.999, shrink: bool = True):
    def abar(u: float) -> float:
        c = math.cos((u + s) / ((1 + s) if shrink else 1.0) * math.pi / 2)
        return c * c if square else c

    betas = [1 - abar((i + 1) / T) / abar(i / T) for i in range(T)]
    if cap is not None:
        betas = [min(b, cap) for b in betas]
    return torch.tensor(betas, dtype=torch.float64), torch.tensor([abar((i + 1) / T) for i in range(T)])


def _schedule_variants(name: str, T: int):
    if name == "linear":
        unscaled = (
            []
            if T == 1000
            else [
                (
                    _linear(T, scale=False),
                    f"your betas run from 1e-4 to 0.02 whatever T: for T = {T} the reference "
                    f"scales both ends by 1000 / T = {1000 / T:g}, so that fewer steps cover the same amount of noise.",
                )
            ]
        )
        return unscaled + [
            (_linear(T, endpoint=False), "your last beta stops one step short of 0.02 · 1000 / T: the T betas are "
             "evenly spaced and include BOTH ends (like np.linspace)."),
        ]  # fmt: skip
    cap_hint = (
        "your last beta is 1 (abar(1) = cos²(π/2) = 0): clip every beta at 0.999, as Improved DDPM does (§3.2), "
        "or the last step destroys the signal completely (abar = 0) and the x_0 prediction, which divides by "
        "sqrt(abar_t), is infinite there."
    )
    betas, abar = _cosine(T)
    return [
        (_cosine(T, cap=None)[0], cap_hint, 1e-9),
        (_cosine(T, s=0.0)[0], "you left out the offset s = 0.008: abar(t) = cos²((t/T + s)/(1 + s) · π/2). "
         "Without it the first betas are tiny (Improved DDPM §3.2 adds s so that beta_0 is not too small)."),
        (_cosine(T, s=0.0, cap=None)[0], "you left out the offset s = 0.008 and the clipping of the betas at 0.999."),
        (_cosine(T, shrink=False)[0], "you added the offset s but did not divide by (1 + s): the argument is "
         "(t/T + s) / (1 + s) · π/2, so that it reaches π/2 exactly at t = T."),
        (_cosine(T, square=False)[0], "your abar is cos(...), not cos²(...): Improved DDPM's schedule squares the "
         "cosine."),
        (abar, "you returned abar_t, not beta_t: beta_t = 1 - abar(t+1)/abar(t), one ratio of consecutive "
         "values per step."),
        (1 - abar, "you returned 1 - abar_t, not beta_t: beta_t = 1 - abar(t+1)/abar(t) (a ratio of consecutive "
         "values), clipped at 0.999."),
    ]  # fmt: skip


def check_beta_schedule(fn) -> None:
    """Exercise 5.1: ``fn(name, T)`` -> betas, float64 tensor [T], for "linear" and "cosine"."""
    ex = SCHEDULE
    for name, T in [("linear", 1000), ("cosine", 1000), ("linear", 250), ("cosine", 50)]:
        got = checks.expect_tensor(ex, checks.call(ex, fn, name, T))
        checks.expect_shape(ex, got, (T,), hints={(T + 1,): "one beta per step: T values, not T + 1."})
        checks.expect_dtype(
            ex, got, torch.float64, "Schedules are kept in float64 (abar_999 of the linear schedule is 4e-5, and "
            "products of 1000 numbers lose digits in float32); the reference casts to float32 only per step."
        )  # fmt: skip
        expected = torch.from_numpy(_diffusion.get_named_beta_schedule(name, T))
        variants = [(expected.float().double(), FLOAT32_TABLES, 1e-7)]  # right, in float32, converted at the end
        variants += [(v[0], v[1], v[2] if len(v) > 2 else 1e-9) for v in _schedule_variants(name, T)]
        diagnose = _diagnose_with(variants)

        def with_case(got, name=name, T=T, diagnose=diagnose):
            return diagnose(got) or f"(case: {name!r}, T = {T})"

        checks.expect_close(ex, got, expected, atol=1e-12, rtol=1e-9, diagnose=with_case)
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.2 (q_sample)
# --------------------------------------------------------------------------

Q_SAMPLE = "5.2 (q_sample)"


def _q_sample_variants(x0, t, noise, betas):
    tab, n = _tables(betas), x0.ndim
    abar, alpha, abar_prev = (_per_sample(tab[k], t, n) for k in ("abar", "alphas", "abar_prev"))
    x, e = x0.double(), noise.double()
    abar_row = tab["abar"][t].double()  # [B]: broadcast against the LAST axis if not reshaped
    out = [
        (abar * x + (1 - abar) * e, "no square roots: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The "
         "coefficients are standard deviations, and their squares add up to 1 (variance preserving)."),
        (abar.sqrt() * x + (1 - abar) * e, "the noise coefficient needs a square root too: sqrt(1 - abar_t) is a "
         "standard deviation; the variance of x_t is abar_t + (1 - abar_t) = 1."),
        (abar * x + (1 - abar).sqrt() * e, "the signal coefficient needs a square root too: sqrt(abar_t) x_0."),
        (alpha.sqrt() * x + (1 - alpha).sqrt() * e, "you used alpha_t = 1 - beta_t, the one-step factor: jumping "
         "from x_0 to x_t in one go uses the PRODUCT abar_t = alpha_0 · alpha_1 ··· alpha_t (torch.cumprod)."),
        (abar_prev.sqrt() * x + (1 - abar_prev).sqrt() * e, "off by one in t: you used abar_{t-1}. Step t = 0 "
         "already adds noise beta_0, so x_t uses abar_t = prod_{s <= t} alpha_s."),
        (abar.sqrt() * e + (1 - abar).sqrt() * x, "x_0 and the noise are swapped: sqrt(abar_t) multiplies the "
         "image, sqrt(1 - abar_t) the noise."),
        ((1 - abar).sqrt() * x + abar.sqrt() * e, "x_0 and the noise are swapped: sqrt(abar_t) multiplies the "
         "image, sqrt(1 - abar_t) the noise."),
        (abar.sqrt() * x + (1 - abar.sqrt()) * e, "the noise coefficient is sqrt(1 - abar_t), not 1 - sqrt(abar_t)."),
    ]  # fmt: skip
    if x0.shape[-1] == len(t):
        out.append((abar_row.sqrt() * x + (1 - abar_row).sqrt() * e,
                    f"your coefficients [B] broadcast against the LAST axis of x_0 {tuple(x0.shape)}: reshape them "
                    "to [B, 1, 1, 1] (one per image) before multiplying."))  # fmt: skip
    return [(v.float(), h, 1e-5) for v, h in out]


def check_q_sample(fn) -> None:
    """Exercise 5.2: ``fn(x_0, t, noise, betas)`` -> x_t, float32 [B, ...], like x_0."""
    ex = Q_SAMPLE
    g = checks.seeded(52)
    linear = torch.from_numpy(_diffusion.get_named_beta_schedule("linear", 1000))
    cosine = torch.from_numpy(_diffusion.get_named_beta_schedule("cosine", 1000))
    cases = [  # B == W in the first: coefficients that broadcast against the last axis do not crash there
        (torch.randn(4, 3, 8, 4, generator=g), torch.tensor([0, 7, 500, 999]), linear),
        (torch.randn(4, 3, 8, 4, generator=g), torch.tensor([999, 1, 250, 0]), cosine),
        (torch.randn(3, 5, generator=g), torch.tensor([2, 998, 40]), linear),
    ]
    for x0, t, betas in cases:
        noise = torch.randn(x0.shape, generator=g)
        args = [x0.clone(), t.clone(), noise.clone(), betas.clone()]
        got = checks.expect_tensor(ex, checks.call(ex, fn, *args))
        _unchanged(ex, [x0, t, noise, betas], args)
        checks.expect_shape(ex, got, tuple(x0.shape))
        checks.expect_dtype(ex, got, torch.float32, FLOAT32_HINT)
        expected = _reference(betas).q_sample(x0, t, noise=noise)
        checks.expect_close(
            ex, got, expected, atol=1e-6, rtol=1e-5, diagnose=_diagnose_with(_q_sample_variants(x0, t, noise, betas))
        )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.3 (posterior_coefficients)
# --------------------------------------------------------------------------

POSTERIOR = "5.3 (posterior_coefficients)"
POSTERIOR_NAMES = ("coef1 (the x_0 coefficient)", "coef2 (the x_t coefficient)", "the variance beta~_t",
                   "the clipped log-variance")  # fmt: skip


def _posterior_variants(betas):
    tab = _tables(betas)
    a, ab, abp = tab["alphas"], tab["abar"], tab["abar_prev"]
    abp0 = torch.cat([ab.new_zeros(1), ab[:-1]])  # abar_{-1} taken as 0
    var = betas * (1 - abp) / (1 - ab)
    right = [betas * abp.sqrt() / (1 - ab), (1 - abp) * a.sqrt() / (1 - ab), var]
    zero_prev = "at t = 0, abar_{t-1} = abar_{-1} = 1 (an empty product: no noise yet), not 0: prepend 1."
    swapped = ("abar_t and abar_{t-1} are swapped: in the posterior the denominators are 1 - abar_t (x_t is the "
               "noisier one) and abar_{t-1} appears in the numerators.")  # fmt: skip
    with torch.no_grad():
        coef1 = [
            (betas * ab.sqrt() / (1 - abp), swapped),
            (betas * abp0.sqrt() / (1 - ab), zero_prev),
            (betas * ab.sqrt() / (1 - ab), "coef1 uses sqrt(abar_{t-1}), not sqrt(abar_t): x_0 enters through "
             "q(x_{t-1} | x_0), whose mean is sqrt(abar_{t-1}) x_0."),
            (betas * abp / (1 - ab), "coef1 needs the square root: beta_t sqrt(abar_{t-1}) / (1 - abar_t)."),
            (right[1], "coef1 and coef2 are swapped: coef1 multiplies x_0, coef2 multiplies x_t."),
        ]  # fmt: skip
        coef2 = [
            ((1 - ab) * a.sqrt() / (1 - abp), swapped),
            ((1 - abp0) * a.sqrt() / (1 - ab), zero_prev),
            ((1 - abp) * a / (1 - ab), "coef2 needs sqrt(alpha_t), not alpha_t: x_t enters through "
             "q(x_t | x_{t-1}), whose mean is sqrt(alpha_t) x_{t-1}."),
            ((1 - abp) * ab.sqrt() / (1 - ab), "coef2 uses sqrt(alpha_t) (one step, from q(x_t | x_{t-1})), not "
             "sqrt(abar_t)."),
            (right[0], "coef1 and coef2 are swapped: coef1 multiplies x_0, coef2 multiplies x_t."),
        ]  # fmt: skip
        variance = [
            (betas * (1 - ab) / (1 - abp), swapped),
            (betas * (1 - abp0) / (1 - ab), zero_prev),
            (betas.clone(), "that is beta_t, the variance of the forward step q(x_t | x_{t-1}); the posterior "
             "q(x_{t-1} | x_t, x_0) is narrower: beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)."),
            (1 / (a / betas + 1 / (1 - abp)), None),  # the precision form: right (equal up to rounding)
        ]  # fmt: skip
        log_var = [
            (torch.log(betas), "you used log beta_t: the clipped log-variance is log beta~_t, with beta~_1 in place "
             "of beta~_0 = 0."),
            (torch.log(var), "log beta~_0 = log 0 = -inf: clip it by using beta~_1 at t = 0 (the reference's "
             "posterior_log_variance_clipped), so that the learned variance never interpolates towards -inf."),
            (torch.cat([torch.log(betas[:1]), torch.log(var[1:])]), "at t = 0 the reference uses log beta~_1, not "
             "log beta_0: the posterior variance of the next step (beta~_0 = 0)."),
            (var, "the fourth table is the LOG of the clipped variance."),
            (torch.cat([var[1:2], var[1:]]), "the fourth table is the LOG of the clipped variance."),
        ]  # fmt: skip
    # right, but computed in float32 and converted at the end
    # right, but computed in float32 with these formulas (then converted)
    b32 = betas.float()
    tab32 = _tables(b32)
    a32, ab32, abp32 = tab32["alphas"], tab32["abar"], tab32["abar_prev"]
    var32 = b32 * (1 - abp32) / (1 - ab32)
    single = [b32 * abp32.sqrt() / (1 - ab32), (1 - abp32) * a32.sqrt() / (1 - ab32), var32,
              torch.log(torch.cat([var32[1:2], var32[1:]]))]  # fmt: skip
    tables = [[(w, h, 1e-9) for w, h in table] for table in (coef1, coef2, variance, log_var)]
    for table, w in zip(tables, single):
        table.insert(0, (w.double(), FLOAT32_TABLES, 1e-7))
    return right, tables


def _expect_finite(ex, got, name, hint):
    if not torch.isfinite(got).all():
        bad = (~torch.isfinite(got)).nonzero().flatten()[:3].tolist()
        checks.fail(ex, f"{name} is not finite at t = {bad}. {hint}")


def check_posterior_coefficients(fn) -> None:
    """Exercise 5.3: ``fn(betas)`` -> (coef1, coef2, posterior_variance, posterior_log_variance_clipped),
    four float64 tensors [T]."""
    ex = POSTERIOR
    cases = [
        ("linear, T = 1000", torch.from_numpy(_diffusion.get_named_beta_schedule("linear", 1000))),
        ("cosine, T = 1000", torch.from_numpy(_diffusion.get_named_beta_schedule("cosine", 1000))),
        ("respaced to 25 steps", _diffusion.create_diffusion("25").betas.clone()),
    ]
    for case, betas in cases:
        arg = betas.clone()
        got = checks.call(ex, fn, arg)
        _unchanged(ex, [betas], [arg])
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            checks.fail(ex, "return a tuple of four tables: (coef1, coef2, posterior_variance, "
                            "posterior_log_variance_clipped).")  # fmt: skip
        ref = _reference(betas)
        expected = [ref.posterior_mean_coef1, ref.posterior_mean_coef2, ref.posterior_variance,
                    ref.posterior_log_variance_clipped]  # fmt: skip
        _, variants = _posterior_variants(betas)
        T = len(betas)
        for name, value, exp, wrong in zip(POSTERIOR_NAMES, got, expected, variants):
            value = checks.expect_tensor(ex, value, name)
            checks.expect_shape(ex, value, (T,))
            checks.expect_dtype(ex, value, torch.float64, f"({name}) the tables stay float64 like the betas.")
            if not torch.isfinite(value).all():
                hint = next((h for v, h, tol in wrong if h and checks.matches(value, v, atol=tol)), None)
                if hint is None and name == POSTERIOR_NAMES[3]:
                    hint = "log beta~_0 = log 0 = -inf: use beta~_1 at t = 0 (clipped)."
                _expect_finite(ex, value, name, hint or "")

            def diagnose(v, wrong=wrong, case=case):
                hint = next((h for w, h, tol in wrong if h and checks.matches(v, w, atol=tol)), None)
                return hint or f"(case: {case})"

            checks.expect_close(ex, value, exp, atol=1e-9, rtol=1e-7, diagnose=diagnose, what=f"values of {name}")
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.4 (model_log_variance)
# --------------------------------------------------------------------------

LOG_VARIANCE = "5.4 (model_log_variance)"


def _log_variance_variants(v, t, betas):
    ref = _reference(betas)
    n = v.ndim
    lo = _per_sample(ref.posterior_log_variance_clipped, t, n)
    hi = _per_sample(torch.log(betas), t, n)
    v64 = v.double()
    frac = (v64 + 1) / 2
    right = frac * hi + (1 - frac) * lo
    with torch.no_grad():
        out = [
            (v64 * hi + (1 - v64) * lo, "v is in [-1, 1]: map it to an interpolation weight in [0, 1] first, "
             "frac = (v + 1) / 2."),
            ((1 - frac) * hi + frac * lo, "the ends are swapped: v = +1 (frac = 1) means the largest variance, "
             "beta_t; v = -1 means beta~_t."),
            (torch.log(frac * hi.exp() + (1 - frac) * lo.exp()), "you interpolated the variances and took the log: "
             "Improved DDPM interpolates the LOG-variances (eq. 15), a geometric interpolation; beta_t and beta~_t "
             "differ by orders of magnitude near t = 0."),
            (right.exp(), "you returned a variance: return the log-variance log sigma², interpolated in log space."),
            (frac * hi.exp() + (1 - frac) * lo.exp(), "you returned a variance: return the log-variance "
             "log sigma², interpolated in log space."),
            (0.5 * right, "you returned log sigma (half the log-variance): return log sigma²."),
            (frac * hi + (1 - frac) * _per_sample(torch.log(betas), (t - 1).clamp(min=0), n),
             "the lower end is log beta~_t, the posterior variance (clipped at t = 0), not log beta_{t-1}."),
        ]  # fmt: skip
    return [(w.float(), h, 1e-5) for w, h in out]


def check_model_log_variance(fn) -> None:
    """Exercise 5.4: ``fn(v, t, betas)`` -> log sigma², float32 [B, C, ...] like v."""
    ex = LOG_VARIANCE
    g = checks.seeded(54)
    linear = torch.from_numpy(_diffusion.get_named_beta_schedule("linear", 1000))
    cosine = torch.from_numpy(_diffusion.get_named_beta_schedule("cosine", 1000))
    cases = [  # B == W: coefficients that broadcast against the last axis do not crash
        (torch.rand(4, 3, 8, 4, generator=g) * 2 - 1, torch.tensor([0, 1, 500, 999]), linear),
        (torch.rand(4, 3, 8, 4, generator=g) * 2 - 1, torch.tensor([999, 3, 0, 120]), cosine),
        (torch.tensor([[-1.0, 0.0, 1.0]]).repeat(3, 1), torch.tensor([0, 10, 999]), linear),
    ]
    for v, t, betas in cases:
        args = [v.clone(), t.clone(), betas.clone()]
        got = checks.expect_tensor(ex, checks.call(ex, fn, *args))
        _unchanged(ex, [v, t, betas], args)
        checks.expect_shape(ex, got, tuple(v.shape))
        if not torch.isfinite(got).all():
            checks.fail(ex, "your log-variance is not finite (at t = 0?): beta~_0 = 0, so its log is -inf; use "
                            "the clipped table (beta~_1 at t = 0) from Exercise 5.3.")  # fmt: skip
        checks.expect_dtype(ex, got, torch.float32, FLOAT32_HINT)
        ref = _reference(betas)
        model_output = torch.cat([torch.zeros_like(v), v], dim=1)
        expected = ref.p_mean_variance(None, torch.zeros_like(v), t, model_output=model_output)["log_variance"]
        variants = _log_variance_variants(v, t, betas)
        checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5, diagnose=_diagnose_with(variants))
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.5 (normal_kl)
# --------------------------------------------------------------------------

NORMAL_KL = "5.5 (normal_kl)"


def _kl64(m1, lv1, m2, lv2):
    m1, lv1, m2, lv2 = (a.double() for a in (m1, lv1, m2, lv2))
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _kl_variants(m1, lv1, m2, lv2):
    right = _kl64(m1, lv1, m2, lv2)
    m1d, lv1d, m2d, lv2d = (a.double() for a in (m1, lv1, m2, lv2))
    out = [
        (_kl64(m2, lv2, m1, lv1), "you computed KL(p2 || p1): the KL is not symmetric. The VB term is "
         "KL(q || p_theta), the first distribution (mean1, logvar1) is the one the expectation is taken under."),
        (right / LN2, "you converted to bits: return nats here (natural logs); the loss converts to bits later."),
        (2 * right, "you left out the factor 1/2: KL = ½ (log(s2²/s1²) + (s1² + (m1 - m2)²)/s2² - 1)."),
        (right + 0.5, "you left out the -1: KL(p || p) must be 0."),
        (_kl64(m1, 2 * lv1, m2, 2 * lv2), "you treated the log-variances as log standard deviations."),
        (0.5 * (-1.0 + lv1d - lv2d + torch.exp(lv1d - lv2d) + (m1d - m2d) ** 2 * torch.exp(-lv2d)),
         "the sign of the log term: log(s2²/s1²) = logvar2 - logvar1."),
        (0.5 * (-1.0 + lv2d - lv1d + torch.exp(lv1d - lv2d) + (m1d - m2d) ** 2 * torch.exp(-lv1d)),
         "the squared mean difference is divided by the SECOND variance, s2² = exp(logvar2)."),
        (0.5 * (-1.0 + lv2d - lv1d + torch.exp(lv2d - lv1d) + (m1d - m2d) ** 2 * torch.exp(-lv2d)),
         "the variance ratio is s1²/s2² = exp(logvar1 - logvar2)."),
    ]  # fmt: skip
    return [(v.float(), h, 1e-5) for v, h in out]


def check_normal_kl(fn) -> None:
    """Exercise 5.5: ``fn(mean1, logvar1, mean2, logvar2)`` -> KL(N1 || N2) elementwise, in nats (broadcast)."""
    ex = NORMAL_KL
    g = checks.seeded(55)
    shape = (2, 3, 4, 4)
    cases = [
        (torch.randn(shape, generator=g), torch.rand(shape, generator=g) * -6,
         torch.randn(shape, generator=g), torch.rand(shape, generator=g) * -6),
        # the VB term's shapes: a per-image log-variance [B, 1, 1, 1] for q, a per-pixel one for p_theta
        (torch.randn(shape, generator=g) * 0.1, torch.tensor([-7.0, -3.0]).view(2, 1, 1, 1),
         torch.randn(shape, generator=g) * 0.1, torch.rand(shape, generator=g) * -7),
        (torch.zeros(3), torch.tensor([-1.0, 0.0, 2.0]), torch.zeros(3), torch.tensor([-1.0, 0.0, 2.0])),
    ]  # fmt: skip
    for m1, lv1, m2, lv2 in cases:
        args = [m1.clone(), lv1.clone(), m2.clone(), lv2.clone()]
        got = checks.expect_tensor(ex, checks.call(ex, fn, *args))
        _unchanged(ex, [m1, lv1, m2, lv2], args)
        expected = _diffusion.normal_kl(m1, lv1, m2, lv2)
        checks.expect_shape(ex, got, tuple(expected.shape), hints={
            (): "return the KL elementwise (one value per dimension, broadcast like the inputs), not summed.",
            (2,): "return the KL elementwise: the loss averages it over the dimensions later."})  # fmt: skip
        checks.expect_dtype(ex, got, torch.float32, "float32 inputs give a float32 KL.")
        checks.expect_close(
            ex, got, expected, atol=1e-5, rtol=1e-5, diagnose=_diagnose_with(_kl_variants(m1, lv1, m2, lv2))
        )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.6 (discretized_gaussian_log_likelihood)
# --------------------------------------------------------------------------

DECODER = "5.6 (discretized_gaussian_log_likelihood)"


def _decoder_ll(x, means, log_scales, half=1 / 255, edges=True, scale_is_logvar=False, cdf=None, clamp=True):
    cdf = cdf or _diffusion.approx_standard_normal_cdf
    inv = torch.exp(-(0.5 if scale_is_logvar else 1.0) * log_scales)
    d = x - means
    upper, lower = cdf(inv * (d + half)), cdf(inv * (d - half))

    def log(p):
        return torch.log(p.clamp(min=1e-12)) if clamp else torch.log(p)

    mid = log(upper - lower)
    if not edges:
        return mid
    return torch.where(x < -0.999, log(upper), torch.where(x > 0.999, log(1 - lower), mid))


def _decoder_variants(x, means, log_scales):
    out = [
        (_decoder_ll(x, means, log_scales, half=2 / 255), "the bins are 2/255 wide (256 levels over [-1, 1]): "
         "their edges are x ± 1/255, not x ± 2/255."),
        (_decoder_ll(x, means, log_scales, half=0.5 / 255), "the bins are 2/255 wide (256 levels over [-1, 1]): "
         "their edges are x ± 1/255, not x ± 0.5/255."),
        (_decoder_ll(x, means, log_scales, edges=False), "the end bins: at x = -1 the bin reaches down to -inf "
         "(use Φ(upper) alone), at x = +1 up to +inf (use 1 - Φ(lower)), so the 256 probabilities add up to 1."),
        (_decoder_ll(x, means, log_scales, scale_is_logvar=True), "log_scales is log sigma (a log standard "
         "deviation), not a log-variance: divide by exp(log_scales)."),
        (-_decoder_ll(x, means, log_scales), "the sign: return the log-likelihood (≤ 0); the loss negates it."),
        (_decoder_ll(x, means, log_scales, cdf=torch.special.ndtr), "you used the exact normal CDF: the reference "
         "uses DDPM's tanh approximation, approx_standard_normal_cdf (imported above), and the check compares "
         "with it."),
    ]  # fmt: skip
    return [(v, h, 1e-3) for v, h in out]


def check_discretized_gaussian_log_likelihood(fn) -> None:
    """Exercise 5.6: ``fn(x, means, log_scales)`` -> log p(x) per element in nats, float32 [B, C, ...]."""
    ex = DECODER
    g = checks.seeded(56)
    shape = (2, 3, 8, 8)
    x = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1
    x[:, :, 0, :4] = -1.0  # both end bins appear
    x[:, :, 0, 4:] = 1.0
    means = (x + 0.03 * torch.randn(shape, generator=g)).clamp(-1.2, 1.2)
    log_scales = torch.log(torch.empty(shape).uniform_(0.004, 0.2, generator=g))
    means[:, :, 1, :2] = x[:, :, 1, :2] + 0.6  # so far from x that the bin's probability underflows
    log_scales[:, :, 1, :2] = math.log(0.002)
    cases = [(x, means, log_scales), (x, means[:, :1] * 0 + x[:, :1] * 0.98, torch.full((2, 1, 1, 1), -3.0))]
    for xs, ms, ls in cases:
        args = [xs.clone(), ms.clone(), ls.clone()]
        got = checks.expect_tensor(ex, checks.call(ex, fn, *args))
        _unchanged(ex, [xs, ms, ls], args)
        expected = _diffusion.discretized_gaussian_log_likelihood(xs, ms, ls)
        checks.expect_shape(ex, got, tuple(expected.shape))
        checks.expect_dtype(ex, got, torch.float32, "float32 inputs give float32 log-likelihoods.")
        if not torch.isfinite(got).all():
            checks.fail(ex, "your log-likelihood is -inf or NaN where x lies far out in the tail (the bin's "
                            "probability underflows to 0 in float32): clamp the probability at 1e-12 before the log, "
                            "as the reference does.")  # fmt: skip
        checks.expect_close(
            ex, got, expected, atol=1e-3, rtol=1e-4, diagnose=_diagnose_with(_decoder_variants(xs, ms, ls))
        )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 5.7 (training_losses)
# --------------------------------------------------------------------------

LOSSES = "5.7 (training_losses)"


class TinyEpsModel(nn.Module):
    """A stand-in for the DiT in the check: x_t [B, C, H, W], t [B] -> (eps, v) [B, 2C, H, W], with parameters,
    so that gradients can be followed. Seeded, deterministic, fast."""

    def __init__(self, channels: int = 3, seed: int = 57):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # Conv2d's default init draws: leave the learner's stream alone
            self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.t_scale = nn.Parameter(torch.randn(2 * channels, generator=g) * 0.3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.15)
            self.conv.bias.copy_(torch.randn(2 * channels, generator=g) * 0.1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.t_scale[None, :, None, None] * torch.cos(t.float() / 300)[:, None, None, None]


class _Recorder:
    """Wraps a model: remembers every (x, t) it was called with and every output (kept for autograd)."""

    def __init__(self, model):
        self.model, self.inputs, self.outputs = model, [], []

    def __call__(self, x, t, **kwargs):
        self.inputs.append((x.detach().clone(), t.clone()))
        out = self.model(x, t, **kwargs)
        self.outputs.append(out)
        return out


def _loss_parts(out, x0, x_t, t, noise, betas):
    """The reference's pieces in float64-free form (the reference's own functions, so rounding matches):
    KL at every t, NLL at every t, MSE; used to build the wrong variants."""
    ref = _reference(betas)
    C = x0.shape[1]
    eps, v = torch.split(out.detach(), C, dim=1)
    true_mean, _, true_lv = ref.q_posterior_mean_variance(x0, x_t, t)
    p = ref.p_mean_variance(None, x_t, t, model_output=torch.cat([eps, v], dim=1))
    dims = list(range(1, x0.ndim))
    kl = _diffusion.normal_kl(true_mean, true_lv, p["mean"], p["log_variance"])
    kl_swapped = _diffusion.normal_kl(p["mean"], p["log_variance"], true_mean, true_lv)
    nll = -_diffusion.discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    return {
        "kl": kl.mean(dims) / LN2,
        "nll": nll.mean(dims) / LN2,
        "kl_swapped": kl_swapped.mean(dims) / LN2,
        "kl_sum": kl.sum(dims) / LN2,
        "nll_sum": nll.sum(dims) / LN2,
        "mse": ((noise - eps) ** 2).mean(dims),
        "mse_x0": ((x0 - eps) ** 2).mean(dims),
        "numel": x0[0].numel(),
    }


def _vb_hint(got, parts, t):
    zero = t == 0
    kl, nll = parts["kl"], parts["nll"]
    right = torch.where(zero, nll, kl)
    tests = [
        (right * LN2, "your vb is in nats: divide by ln 2 to get bits per dimension, as the reference does "
         "(the unit of the papers' likelihoods)."),
        (kl, "at t = 0 the VB term is the decoder's negative log-likelihood -log p(x_0 | x_1) (discretised, "
         "Exercise 5.6), not a KL: there is no x_{-1}."),
        (nll, "for t > 0 the VB term is KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)); the decoder NLL is "
         "used only at t = 0."),
        (torch.where(zero, kl, nll), "the two cases are swapped: the decoder NLL at t = 0, the KL for t > 0."),
        (torch.where(zero, nll, parts["kl_swapped"]), "the KL's arguments are swapped: it is KL(q || p_theta), "
         "the true posterior's mean and log-variance first, the model's second."),
        (torch.where(zero, parts["nll_sum"], parts["kl_sum"]), "you summed the VB term over the dimensions: "
         "average it (bits per dimension), like the MSE."),
        (torch.zeros_like(kl), "your vb is 0: with learn_sigma the variance channels v are trained ONLY by the "
         "VB term (see the Spot-the-bug box above)."),
    ]  # fmt: skip
    for variant, hint in tests:
        if checks.matches(got, variant, atol=1e-4):
            return hint
    if checks.matches(got[zero], right[zero], atol=1e-4) and not zero.all():
        return "vb is right at t = 0 but not for t > 0: check the KL term (true posterior, model mean and variance)."
    if checks.matches(got[~zero], right[~zero], atol=1e-4) and zero.any():
        return (
            "vb is right for t > 0 but not at t = 0: the decoder NLL uses the model's mean and log sigma = "
            "½ · log-variance, on the clean x_0."
        )
    return None


def check_training_losses(fn) -> None:
    """Exercise 5.7: ``fn(model, x_0, t, noise, betas)`` -> {"loss", "mse", "vb"}, each float32 [B]."""
    ex = LOSSES
    from minidit.toy import make_batch

    g = checks.seeded(57)
    images, _ = make_batch(torch.arange(6), seed=5, image_size=16)
    x0 = (torch.round((images + 1) * 127.5) / 127.5 - 1).float()  # 8-bit pixels, as the decoder NLL assumes
    linear = torch.from_numpy(_diffusion.get_named_beta_schedule("linear", 1000))
    cosine = torch.from_numpy(_diffusion.get_named_beta_schedule("cosine", 1000))
    cases = [
        (x0, torch.tensor([0, 1, 2, 50, 500, 999]), linear),
        (x0[:4], torch.tensor([999, 0, 10, 0]), cosine),
    ]
    model = TinyEpsModel(3)
    for x, t, betas in cases:
        noise = torch.randn(x.shape, generator=g)
        args = [x.clone(), t.clone(), noise.clone(), betas.clone()]
        rec = _Recorder(model)
        got = checks.call(ex, fn, rec, *args)
        _unchanged(ex, [x, t, noise, betas], args)
        if not isinstance(got, dict) or not {"loss", "mse", "vb"} <= set(got):
            checks.fail(ex, 'return a dict with the keys "loss", "mse" and "vb".')
        if not rec.outputs:
            checks.fail(ex, "your function never called the model.")
        if len(rec.outputs) > 1:
            checks.fail(ex, f"your function called the model {len(rec.outputs)} times: call it once, on x_t; the "
                            "MSE and the VB term both use that one output (eps and v).")  # fmt: skip
        ref = _reference(betas)
        x_t = ref.q_sample(x, t, noise=noise)
        seen_x, seen_t = rec.inputs[0]
        if not torch.equal(seen_t, t):
            checks.fail(ex, f"the model was called with t = {seen_t.tolist()}, expected {t.tolist()}: pass the step "
                            "indices unchanged.")  # fmt: skip
        if not checks.matches(seen_x, x_t, atol=1e-6):
            hint = (
                "it was given x_0: the model sees the NOISY x_t = q_sample(x_0, t, noise)."
                if torch.equal(seen_x, x)
                else "it should see x_t = q_sample(x_0, t, noise) (your Exercise 5.2), with the noise passed in: "
                "draw none of your own."
            )
            checks.fail(ex, "the model was called on the wrong input: " + hint)
        out = rec.outputs[0]
        parts = _loss_parts(out, x, x_t, t, noise, betas)
        expected = ref.training_losses(model, x, t, noise=noise)
        B = len(t)
        for key in ("mse", "vb", "loss"):
            value = checks.expect_tensor(ex, got[key], f'"{key}"')
            checks.expect_shape(ex, value, (B,), hints={
                (): f'"{key}" is per sample, [B]: average over every dimension but the batch (the trainer takes '
                    "the batch mean)."})  # fmt: skip
            checks.expect_dtype(
                ex,
                value,
                torch.float32,
                "Float64 losses mean that float64 table values met the "
                "images: cast each per-step coefficient to float32, shaped [B, 1, 1, 1].",
            )
        mse_hints = [
            (parts["mse"] * parts["numel"], "you summed the squared error over the dimensions: average it "
             "(mean over C, H, W), per sample."),
            (parts["mse_x0"], "the target is the noise eps that made x_t, not x_0: DiT predicts eps."),
        ]  # fmt: skip
        checks.expect_close(ex, got["mse"], expected["mse"], atol=1e-5, rtol=1e-4, what='"mse" values',
                            diagnose=_diagnose_with([(v, h, 1e-4) for v, h in mse_hints]))  # fmt: skip
        checks.expect_close(ex, got["vb"], expected["vb"], atol=1e-5, rtol=1e-4, what='"vb" values',
                            diagnose=lambda v, parts=parts, t=t: _vb_hint(v, parts, t))  # fmt: skip
        loss_hints = [
            (expected["mse"], "your loss is the MSE alone: the hybrid loss is mse + vb (Spot the bug above)."),
            (expected["mse"] + 0.001 * expected["vb"], "no λ = 0.001 here: the reference adds the per-step VB term "
             "unscaled; Improved DDPM's λ multiplies the whole bound, a sum of T = 1000 such terms, so λ·T = 1."),
            (expected["vb"], "your loss is the VB term alone: the hybrid loss is mse + vb."),
        ]  # fmt: skip
        checks.expect_close(ex, got["loss"], expected["loss"], atol=1e-5, rtol=1e-4, what='"loss" values',
                            diagnose=_diagnose_with([(v, h, 1e-4) for v, h in loss_hints]))  # fmt: skip

        # Gradients: the VB term must reach v only, the MSE eps only.
        C = x.shape[1]
        vb = got["vb"]
        if not vb.requires_grad:
            checks.fail(ex, "your vb carries no gradient: it must train the variance channels v (detach only eps, "
                            "the mean's input, not v).")  # fmt: skip
        (grad_vb,) = torch.autograd.grad(vb.sum(), out, retain_graph=True, allow_unused=True)
        grad_vb = torch.zeros_like(out) if grad_vb is None else grad_vb
        if grad_vb[:, :C].abs().max() > 0:
            checks.fail(ex, "the VB term sends gradient into eps (the first C output channels): stop the gradient "
                            "of the mean (detach eps where the VB term uses it), so that the VB term trains only the "
                            "variance and the mean is learned from the MSE alone (Improved DDPM §3.1).")  # fmt: skip
        if grad_vb[:, C:].abs().max() == 0:
            checks.fail(ex, "the VB term sends no gradient into v (the last C output channels): detach only eps, "
                            "not v.")  # fmt: skip
        if got["mse"].requires_grad:
            (grad_mse,) = torch.autograd.grad(got["mse"].sum(), out, allow_unused=True)
            if grad_mse is not None and grad_mse[:, C:].abs().max() > 0:
                checks.fail(ex, "the MSE reaches v: it compares only eps, the first C channels, with the noise.")
        else:
            checks.fail(ex, "your mse carries no gradient: it is what trains eps, do not detach it.")
    checks.passed(ex)
