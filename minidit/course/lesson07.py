"""Checks for lesson 07: sampling, respacing, DDIM and classifier-free guidance.

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs, compares it with the
reference in ``minidit`` (``GaussianDiffusion.p_sample`` / ``ddim_sample``, ``respace_betas``,
``DiT.forward_with_cfg``), prints one line on success, or raises ``AssertionError`` naming the likely
mistake (found by comparing with known wrong variants, computed here in float64).

The model in the checks is a small deterministic stand-in (``_toy_model``): its output depends on the
step it is given, so a sampler that feeds it the respaced index instead of the original one is caught.
"""

from __future__ import annotations

import torch

from minidit.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule
from minidit.diffusion import respace_betas as _respace_betas
from minidit.model import DiT

from . import checks

FLOAT32_HINT = (
    "The diffusion's tables are float64; cast each per-step coefficient to float32 before it meets the "
    "images, as the reference does: a float64 x_{t-1} would not go through the DiT's float32 layers."
)


def _diagnose_with(variants):
    def diagnose(got, variants=variants):
        for variant, hint in variants:
            if checks.matches(got, variant, atol=1e-4):
                return hint
        return None

    return diagnose


class _ToyModel:
    """model(x, t) -> [B, 2C, ...] = (eps, v), a smooth function of x and of the step t it is given; it
    records every t it was called with."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.detach().clone())
        s = t.float().view(-1, *([1] * (x.ndim - 1)))
        eps = 0.8 * x + 0.3 * torch.sin(s / 37.0 + x.flip(1))
        v = torch.tanh(0.7 * x.flip(1) + torch.cos(s / 53.0))
        return torch.cat([eps, v], dim=1)


def _at(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return table[t].double().view(-1, *([1] * (ndim - 1)))


def _timestep_check(ex: str, model: _ToyModel, t: torch.Tensor, diffusion: GaussianDiffusion) -> None:
    if not model.seen:
        checks.fail(ex, "your function never called `model`: it must compute eps and v with model(x, t_model).")
    if len(model.seen) > 1:
        checks.fail(ex, f"your function called `model` {len(model.seen)} times: once per step is enough.")
    fed, expected = model.seen[0], diffusion.timestep_map[t]
    if torch.equal(fed.long(), t) and not torch.equal(t, expected):
        checks.fail(
            ex, f"you fed the model the respaced step t = {t.tolist()}; it was trained on the original steps "
            f"0..999 and must see timestep_map[t] = {expected.tolist()}."
        )  # fmt: skip
    if fed.shape != expected.shape or not torch.equal(fed.long(), expected):
        checks.fail(
            ex, f"the model was called with t = {fed.tolist()}, expected timestep_map[t] = {expected.tolist()}."
        )


# --------------------------------------------------------------------------
# Exercise 7.1 (p_sample)
# --------------------------------------------------------------------------

P_SAMPLE = "7.1 (p_sample)"


def _p_sample_variants(diffusion, out, x, t, noise, clip):
    n, C = x.ndim, x.shape[1]
    eps, v = out.double().split(C, dim=1)
    xd, z = x.double(), noise.double()
    abar = _at(diffusion.alphas_cumprod, t, n)
    beta = _at(diffusion.betas, t, n)
    c1, c2 = _at(diffusion.posterior_mean_coef1, t, n), _at(diffusion.posterior_mean_coef2, t, n)
    min_log = _at(diffusion.posterior_log_variance_clipped, t, n)
    frac = (v + 1) / 2
    log_var = frac * beta.log() + (1 - frac) * min_log
    nonzero = (t != 0).double().view(-1, *([1] * (n - 1)))

    def x0_of(x0):
        return x0.clamp(-1, 1) if clip else x0

    x0 = x0_of((xd - (1 - abar).sqrt() * eps) / abar.sqrt())
    mean = c1 * x0 + c2 * xd

    def step(mean=mean, sigma=None, mask=nonzero):
        sigma = (0.5 * log_var).exp() if sigma is None else sigma
        return (mean + mask * sigma * z).float()

    out_list = [
        (step(mask=1.0), "at t = 0 the step returns the mean without noise (DDPM Alg. 2: z = 0 when t = 1 in the "
         "paper's counting): multiply the noise by 0 for the images whose t is 0."),
        (step(sigma=beta.sqrt()), "your sigma is sqrt(beta_t), the fixed variance: this DiT learned its variance; "
         "use log sigma^2 = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2."),
        (step(sigma=(0.5 * min_log).exp()), "your sigma ignores v (it is sqrt(beta~_t)): the learned variance "
         "interpolates log beta~_t and log beta_t with frac = (v + 1) / 2."),
        (step(sigma=log_var.exp()), "you multiplied the noise by exp(log sigma^2) = sigma^2, the variance: the "
         "standard deviation is exp(0.5 · log sigma^2)."),
        (step(sigma=(v * beta.log() + (1 - v) * min_log).exp().sqrt()), "frac = (v + 1) / 2 maps v in [-1, 1] "
         "to [0, 1]; you used v itself."),
        (step(mean=c1 * x0_of(abar.sqrt() * xd - (1 - abar).sqrt() * eps) + c2 * xd), "your x0_hat is "
         "sqrt(abar) x_t - sqrt(1 - abar) eps: solve x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps for x_0 instead."),
        (step(mean=c1 * x0_of((xd - (1 - abar).sqrt() * eps) / abar) + c2 * xd), "your x0_hat divides by abar_t; "
         "x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."),
        (step(mean=c2 * x0 + c1 * xd), "coef1 multiplies x0_hat and coef2 multiplies x_t, not the other way."),
    ]  # fmt: skip
    if clip:
        unclipped = (xd - (1 - abar).sqrt() * eps) / abar.sqrt()
        out_list.append((step(mean=c1 * unclipped + c2 * xd), "with clip_denoised=True, clamp x0_hat to [-1, 1] "
                         "before it goes into the posterior mean."))  # fmt: skip
    return out_list


def _generator_check(ex: str, g: torch.Generator, shape: tuple[int, ...], seed: int) -> None:
    ref = checks.seeded(seed)
    torch.randn(shape, generator=ref)
    if torch.equal(g.get_state(), checks.seeded(seed).get_state()):
        checks.fail(ex, "you did not draw from `generator`: draw the noise with torch.randn(x.shape, "
                    "generator=generator) so that the samples are reproducible.")  # fmt: skip
    if not torch.equal(g.get_state(), ref.get_state()):
        checks.fail(ex, f"draw exactly ONE tensor of x's shape {tuple(shape)} from `generator` per step, even when "
                    "some t are 0 (multiply its noise by 0 there): the reference draws in this order, and later "
                    "cells compare your sampler with it.")  # fmt: skip


def check_p_sample(fn) -> None:
    """Exercise 7.1: ``fn(model, x, t, diffusion, generator, clip_denoised)`` -> x_{t-1}, float32 like x."""
    ex = P_SAMPLE
    cases = [
        (create_diffusion("10", "cosine"), torch.tensor([9, 5, 1, 0]), False, 1.0),
        (create_diffusion("", "linear"), torch.tensor([999, 500, 0, 3]), True, 1.5),
        (create_diffusion("25", "cosine"), torch.tensor([24, 12, 13]), True, 1.0),
    ]
    for k, (diffusion, t, clip, scale) in enumerate(cases):
        gx = checks.seeded(70 + k)
        x = scale * torch.randn(len(t), 3, 5, 5, generator=gx)  # 75 per image: per-image draws differ
        seed = 710 + k
        model = _ToyModel()
        g = checks.seeded(seed)
        got = checks.call(ex, fn, model, x.clone(), t.clone(), diffusion, g, clip)
        got = checks.expect_tensor(ex, got, "x_{t-1}")
        _timestep_check(ex, model, t, diffusion)
        _generator_check(ex, g, tuple(x.shape), seed)
        checks.expect_shape(ex, got, tuple(x.shape))
        checks.expect_dtype(ex, got, torch.float32, FLOAT32_HINT)
        expected = diffusion.p_sample(_ToyModel(), x, t, clip_denoised=clip, generator=checks.seeded(seed))["sample"]
        noise = torch.randn(x.shape, generator=checks.seeded(seed))
        out = _ToyModel()(x, diffusion.timestep_map[t])
        variants = _p_sample_variants(diffusion, out, x, t, noise, clip)
        checks.expect_close(ex, got, expected, atol=1e-4, rtol=1e-4, diagnose=_diagnose_with(variants))
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 7.2 (respace_betas)
# --------------------------------------------------------------------------

RESPACE = "7.2 (respace_betas)"


def check_respace_betas(fn) -> None:
    """Exercise 7.2: ``fn(betas, use_timesteps)`` -> (new betas float64 [S], timestep_map int64 [S])."""
    from minidit.diffusion import space_timesteps

    ex = RESPACE
    cosine = torch.from_numpy(get_named_beta_schedule("cosine", 1000))
    linear = torch.from_numpy(get_named_beta_schedule("linear", 1000))
    cases = [
        (cosine, sorted(space_timesteps(1000, "25"))),
        (linear, [999, 300, 17, 5]),  # unsorted, and the first kept step is not 0
        (cosine, sorted(space_timesteps(1000, "ddim10"))),
    ]
    for betas, keep in cases:
        got = checks.call(ex, fn, betas.clone(), list(keep))
        if not isinstance(got, tuple) or len(got) != 2:
            checks.fail(ex, "return a pair (new_betas, timestep_map).")
        new_betas = checks.expect_tensor(ex, got[0], "new_betas")
        timestep_map = checks.expect_tensor(ex, got[1], "timestep_map")
        ref_betas, ref_map = _respace_betas(betas.numpy(), keep)
        S = len(ref_map)
        checks.expect_shape(ex, new_betas, (S,))
        checks.expect_shape(ex, timestep_map, (S,))
        checks.expect_dtype(ex, new_betas, torch.float64, "Schedules stay in float64, as in lesson 05.")
        checks.expect_dtype(ex, timestep_map, torch.int64, "timestep_map indexes steps: an int64 (long) tensor.")
        if not torch.equal(timestep_map, torch.tensor(ref_map)):
            if torch.equal(timestep_map, torch.arange(S)):
                hint = ("timestep_map is the ORIGINAL step of each kept step (what the model was trained on), "
                        "not 0..S-1.")  # fmt: skip
            elif sorted(timestep_map.tolist()) == ref_map:
                hint = (
                    "keep the steps in increasing order (the process runs from step 0 upwards), whatever "
                    "order they come in."
                )
            else:
                hint = "timestep_map lists the kept original steps, in increasing order."
            checks.fail(ex, f"timestep_map {timestep_map.tolist()[:8]}... differs from {ref_map[:8]}...: {hint}")
        abar = torch.cumprod(1 - betas, 0)
        idx = torch.tensor(ref_map)
        ref = torch.from_numpy(ref_betas)
        wrong_first = ref.clone()
        wrong_first[0] = betas[idx[0]]
        variants = [
            (betas[idx], "you kept the original betas at those steps: a respaced step jumps from t_{k-1} to t_k, "
             "so beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}, which keeps abar at every kept step (Improved DDPM §4)."),
            (wrong_first, "the first respaced beta jumps from no noise at all (abar = 1) to abar_{t_0}: it is "
             "1 - abar_{t_0}, not beta_{t_0}."),
            (1 - torch.cat([abar.new_ones(1), abar[idx][:-1]]) / abar[idx], "the ratio is upside down: "
             "beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}} (the later, smaller abar on top)."),
            (abar[idx], "you returned abar at the kept steps; the betas are 1 - consecutive ratios of them."),
        ]  # fmt: skip
        skip_first = ref.clone()
        skip_first[0] = 1 - abar[idx[0]] / abar[0]
        variants.append((skip_first, "the first respaced beta starts from abar_{-1} = 1 (no noise yet), not from "
                             "abar_0: it is 1 - abar_{t_0}."))  # fmt: skip

        def diagnose(g, variants=variants):
            return next((h for v, h in variants if checks.matches(g, v.double(), atol=1e-12)), None)

        checks.expect_close(ex, new_betas, ref, atol=1e-12, rtol=1e-9, diagnose=diagnose)
        kept_abar = torch.cumprod(1 - new_betas, 0)
        if not torch.allclose(kept_abar, abar[idx], rtol=1e-9, atol=0):  # pragma: no cover (implied by the above)
            checks.fail(ex, "the respaced process must keep abar at every kept step.")
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 7.3 (ddim_step)
# --------------------------------------------------------------------------

DDIM = "7.3 (ddim_step)"


def _ddim_variants(diffusion, out, x, t):
    n, C = x.ndim, x.shape[1]
    eps = out.double()[:, :C]
    xd = x.double()
    abar, abar_prev = _at(diffusion.alphas_cumprod, t, n), _at(diffusion.alphas_cumprod_prev, t, n)
    x0 = (xd - (1 - abar).sqrt() * eps) / abar.sqrt()
    wrapped = _at(diffusion.alphas_cumprod, t - 1, n)  # t - 1 = -1 wraps to the last step
    alpha = _at(1 - diffusion.betas, t, n)

    def step(x0=x0, ap=abar_prev):
        return (ap.sqrt() * x0 + (1 - ap).sqrt() * eps).float()

    return [
        (step(ap=abar), "your x_{t-1} uses abar_t, the level you start from: DDIM's step lands on abar_{t-1} "
         "(alphas_cumprod_prev)."),
        (step(ap=wrapped), "at t = 0 you used alphas_cumprod[t - 1] = alphas_cumprod[-1] (the LAST step): the "
         "level after step 0 is abar_{-1} = 1, which alphas_cumprod_prev holds."),
        (step(ap=alpha), "you used alpha_t = 1 - beta_t; DDIM needs the cumulative abar_{t-1}."),
        (step(x0=abar.sqrt() * xd - (1 - abar).sqrt() * eps), "your x0_hat is sqrt(abar) x_t - sqrt(1 - abar) eps: "
         "solve x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for x_0 instead."),
        (step(x0=(xd - (1 - abar).sqrt() * eps) / abar), "your x0_hat divides by abar_t; it divides by sqrt(abar_t)."),
        ((abar_prev.sqrt() * x0 + (1 - abar_prev) * eps).float(), "the noise direction is scaled by "
         "sqrt(1 - abar_{t-1}), a standard deviation."),
    ]  # fmt: skip


def check_ddim_step(fn) -> None:
    """Exercise 7.3: ``fn(model, x, t, diffusion)`` -> x_{t-1} (DDIM, eta = 0), float32 like x."""
    ex = DDIM
    cases = [
        (create_diffusion("10", "cosine"), torch.tensor([9, 5, 1, 0])),
        (create_diffusion("ddim50", "linear"), torch.tensor([49, 0, 20])),
    ]
    for k, (diffusion, t) in enumerate(cases):
        x = torch.randn(len(t), 3, 4, 4, generator=checks.seeded(73 + k))
        model = _ToyModel()
        state = torch.get_rng_state()
        got = checks.expect_tensor(ex, checks.call(ex, fn, model, x.clone(), t.clone(), diffusion), "x_{t-1}")
        _timestep_check(ex, model, t, diffusion)
        checks.expect_shape(ex, got, tuple(x.shape))
        checks.expect_dtype(ex, got, torch.float32, FLOAT32_HINT)
        torch.set_rng_state(state)
        again = checks.call(ex, fn, _ToyModel(), x.clone(), t.clone(), diffusion)
        if not torch.equal(torch.get_rng_state(), state) or not torch.equal(again, got):
            checks.fail(ex, "DDIM with eta = 0 draws no noise: x_{t-1} is a deterministic function of x_t "
                        "(DDIM §4.1). Your step drew random numbers.")  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the reference draws (unused) noise even for eta = 0
            expected = diffusion.ddim_sample(_ToyModel(), x, t, eta=0.0)["sample"]
        out = _ToyModel()(x, diffusion.timestep_map[t])
        checks.expect_close(ex, got, expected, atol=1e-4, rtol=1e-4,
                            diagnose=_diagnose_with(_ddim_variants(diffusion, out, x, t)))  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 7.4 (guide)
# --------------------------------------------------------------------------

GUIDE = "7.4 (guide)"


class _Stand:
    """What ``DiT.forward_with_cfg`` reads of ``self``: in_channels and forward (returning a fixed output)."""

    def __init__(self, out: torch.Tensor):
        self.out, self.in_channels = out, out.shape[1] // 2

    def forward(self, x, t, y):
        return self.out


def _reference_guide(out: torch.Tensor, scale: float, guided_channels: int | None) -> torch.Tensor:
    B2 = out.shape[0]
    x = torch.zeros(B2, out.shape[1] // 2, *out.shape[2:])
    t = torch.zeros(B2, dtype=torch.long)
    return DiT.forward_with_cfg(_Stand(out), x, t, t, scale, guided_channels=guided_channels)


def _guide_variants(out, s, n):
    B, C2 = out.shape[0] // 2, out.shape[1]
    C = C2 // 2
    cond, uncond = out[:B].double(), out[B:].double()

    def assemble(k, combine):
        g = combine(cond[:, :k], uncond[:, :k])
        return torch.cat([torch.cat([g, g]), out[:, k:].double()], dim=1)

    right = lambda c, u: u + s * (c - u)  # noqa: E731
    variants = [
        (assemble(n, lambda c, u: u + s * c), "guidance is eps_uncond + s · (eps_cond - eps_uncond): you left out "
         "the - s · eps_uncond."),
        (assemble(n, lambda c, u: c + s * (u - c)), "conditional and unconditional are swapped: the first half of "
         "the batch carries the real labels (cond), the second the null label (uncond)."),
        (assemble(n, lambda c, u: c + s * (c - u)), "the guided eps starts from eps_uncond: "
         "eps_uncond + s · (eps_cond - eps_uncond), so that s = 1 gives back eps_cond."),
        (assemble(C2, right), "you guided the variance channels too: only the eps channels are guided; each half "
         "keeps its own v (the model's variance)."),
        (torch.cat([torch.cat([assemble(n, right)[:B], out[B:].double()])]), "the second half must carry the "
         "guided eps too (both halves of the batch step with it), with its own unguided channels."),
    ]  # fmt: skip
    if n != C:
        variants.append((assemble(C, right), f"guided_channels = {n} asks to guide only the first {n} channels "
                         f"(the reference's GLIDE leftover); you guided all {C} eps channels."))  # fmt: skip
    else:
        variants.append((assemble(3, right), f"guided_channels=None guides all {C} eps channels; you guided 3."))
    return [(v.float(), h) for v, h in variants]


def check_guide(fn) -> None:
    """Exercise 7.4: ``fn(model_output, cfg_scale, guided_channels)`` -> [2B, 2C, ...], like model_output."""
    ex = GUIDE
    g = checks.seeded(74)
    cases = [(4, 3, 4.0, 3), (4, 4, 1.5, 3), (2, 4, 3.0, None), (2, 3, 0.0, None)]
    for B, C, s, n in cases:
        out = torch.randn(2 * B, 2 * C, 4, 4, generator=g)
        got = checks.call(ex, fn, out.clone(), s, n)
        got = checks.expect_tensor(ex, got, "the guided output")
        checks.expect_shape(ex, got, tuple(out.shape), hints={
            (B, 2 * C, 4, 4): "return both halves of the batch ([2B, ...]): the sampler steps both with the "
            "guided eps (lesson: the batch is [z, z]).",
            (2 * B, C, 4, 4): "keep the variance channels: the output has 2C channels, like the model's.",
            (B, C, 4, 4): "return the full [2B, 2C, ...]: both halves, and the variance channels."})  # fmt: skip
        checks.expect_dtype(ex, got, torch.float32)
        expected = _reference_guide(out, s, n)
        variants = _guide_variants(out, s, n if n is not None else C)
        checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-5, diagnose=_diagnose_with(variants),
                            what=f"guided outputs (case B={B}, C={C}, scale {s:g}, guided_channels={n})")  # fmt: skip
    checks.passed(ex)


__all__ = ["check_p_sample", "check_respace_betas", "check_ddim_step", "check_guide"]
