"""Checks for lesson 08: latent diffusion.

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs and compares it with
``minidit.vae`` (``sample_posterior``, ``SCALE``) or with the bytes a real AdamW step allocates,
exactly where later cells rely on it (the same random draws, in the same order). On a mismatch the
check compares with known wrong variants to name the likely mistake.
"""

from __future__ import annotations

import torch

from minidit.vae import SCALE, sample_posterior

from . import checks

# --------------------------------------------------------------------------
# Exercise 8.1 (scale_factor)
# --------------------------------------------------------------------------

SCALE_FACTOR = "8.1 (scale_factor)"


def _latents(seed: int, shape: tuple[int, ...], std: float, shift: float) -> torch.Tensor:
    g = checks.seeded(seed)
    return torch.randn(shape, generator=g) * std + shift + 0.5 * torch.randn(shape[1:2], generator=g).view(1, -1, 1, 1)


def check_scale_factor(fn) -> None:
    """Exercise 8.1: ``fn(z [B, C, h, w])`` -> float, 1 / (the standard deviation of all elements of z)."""
    ex = SCALE_FACTOR
    for seed, shape, std, shift in [
        (0, (8, 4, 4, 4), 3.0, 0.4),
        (1, (2, 4, 8, 8), 5.5, -1.0),
        (2, (3, 4, 2, 2), 0.7, 0.0),
    ]:
        z = _latents(seed, shape, std, shift)
        before = z.clone()
        got = checks.call(ex, fn, z)
        if not torch.equal(z, before):
            checks.fail(ex, "your function changed z in place: the latents are needed afterwards; compute on a copy.")
        if isinstance(got, torch.Tensor):
            if got.numel() == shape[1]:
                checks.fail(
                    ex,
                    f"you returned {got.numel()} numbers, one per channel: the LDM estimate is ONE "
                    "number, the standard deviation over every element of the batch (all channels).",
                )
            checks.fail(ex, "return a Python float (float(...) of your 0-dim tensor), like vae.config.scaling_factor.")
        if not isinstance(got, float):
            checks.fail(ex, f"return a Python float, got {type(got).__name__}.")
        z64 = z.double().flatten()
        expected = float(1 / z64.std())
        if abs(got - expected) <= 1e-5 * expected:
            continue
        variants = [
            (float(z64.std()), "you returned the standard deviation itself: the scale factor is its INVERSE, so "
             "that scaled latents have standard deviation 1."),
            (float(1 / z64.var()), "you divided by the variance: the scale factor is one over the standard deviation "
             "(its square root)."),
            (float(1 / z64.std(correction=0)), "you used the population standard deviation (dividing by n): the LDM "
             "estimate uses torch's default, Bessel-corrected std (dividing by n - 1)."),
            (float(1 / (z64 - z64.mean()).abs().mean()), "you divided by the mean absolute deviation: use the "
             "standard deviation."),
            (float(1 / z64.pow(2).mean().sqrt()), "you divided by the root mean square, which includes the mean of "
             "z: the standard deviation subtracts the mean first."),
        ]  # fmt: skip
        for value, hint in variants:
            if abs(got - value) <= 1e-5 * abs(value):
                checks.fail(ex, hint)
        checks.fail(ex, f"got {got:.6g}, expected {expected:.6g} (relative tolerance 1e-5) for z of shape {shape}: "
                    "one over the standard deviation of all its elements.")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 8.2 (sample_posterior)
# --------------------------------------------------------------------------

SAMPLE_POSTERIOR = "8.2 (sample_posterior)"


def _moments(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = checks.seeded(seed)
    mean = torch.randn(shape, generator=g) * 4
    std = torch.rand(shape, generator=g) * 0.5 + 0.05
    return mean, std


def check_sample_posterior(fn) -> None:
    """Exercise 8.2: ``fn(mean, std, generator)`` -> ``(mean + std * eps) * SCALE`` with
    ``eps = torch.randn(mean.shape, generator=generator)``, float32 ``[B, C, h, w]``."""
    ex = SAMPLE_POSTERIOR
    for seed, shape in [(0, (2, 4, 4, 4)), (5, (3, 4, 2, 2)), (9, (1, 4, 8, 8))]:
        mean, std = _moments(seed, shape)
        copies = mean.clone(), std.clone()
        outs = []
        for global_seed in (123, 456):
            torch.manual_seed(global_seed)
            g = torch.Generator().manual_seed(1000 + seed)
            outs.append((checks.call(ex, fn, mean, std, g), g))
        if not (torch.equal(mean, copies[0]) and torch.equal(std, copies[1])):
            checks.fail(ex, "your function changed mean or std in place: compute a new tensor.")
        got, g = outs[0]
        got = checks.expect_tensor(ex, got)
        checks.expect_shape(ex, got, shape, {tuple(shape[1:]): "one latent per image: keep the batch dimension."})
        checks.expect_dtype(ex, got, torch.float32, "latents are float32, like the moments.")
        if isinstance(outs[1][0], torch.Tensor) and not torch.equal(got, outs[1][0]):
            checks.fail(ex, "two calls with the same generator gave different latents: draw the noise with the "
                        "generator you are given (generator=...), not from torch's global random state.")  # fmt: skip
        ref_g = torch.Generator().manual_seed(1000 + seed)
        eps = torch.randn(shape, generator=ref_g)
        expected = sample_posterior(mean, std, eps)
        if checks.matches(got, expected, atol=1e-6):
            if not torch.equal(g.get_state(), ref_g.get_state()):
                checks.fail(
                    ex,
                    "the latents are right, but the generator moved on by a different amount: draw the "
                    "noise exactly once, one standard normal per latent element, and nothing else.",
                )
            continue
        g1 = torch.Generator().manual_seed(1000 + seed)
        shared = torch.randn(shape[1:], generator=g1).expand(shape)
        variants = [
            ((mean + std * eps), "you forgot the scale factor: multiply the sample by SCALE (0.18215), which gives "
             "the latents roughly unit variance."),
            ((mean + std * eps) / SCALE, "you divided by the scale factor: encoding MULTIPLIES by SCALE; decoding "
             "divides by it."),
            (mean * SCALE + std * eps, "you scaled only the mean: the whole sample, mean + std * eps, is multiplied "
             "by SCALE."),
            ((mean + std.pow(2) * eps) * SCALE, "you multiplied the noise by the variance: std is already the "
             "standard deviation; it multiplies eps as it is."),
            ((mean + std.sqrt() * eps) * SCALE, "you took the square root of std: it is already the standard "
             "deviation (diffusers computes it as exp(logvar / 2))."),
            ((mean + std * shared) * SCALE, "every image got the same noise: draw one standard normal per element "
             "of the whole batch, of shape mean.shape."),
            (mean * SCALE, "you returned the posterior mean (times SCALE): the exercise draws a sample, "
             "mean + std * eps."),
        ]  # fmt: skip
        for variant, hint in variants:
            if checks.matches(got, variant, atol=1e-6):
                checks.fail(ex, hint)
        checks.fail(ex, f"the latents differ from (mean + std * eps) * SCALE for moments of shape {shape}, with "
                    "eps = one standard normal draw of shape mean.shape from the given generator.")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 8.3 (training_state_bytes)
# --------------------------------------------------------------------------

TRAINING_STATE = "8.3 (training_state_bytes)"
KEYS = ("params", "grads", "adamw", "ema", "total")


def reference_state_bytes(num_params: int) -> dict[str, int]:
    """fp32 training state of a model with ``num_params`` parameters, as the DiT recipe keeps it."""
    params = 4 * num_params
    out = {"params": params, "grads": params, "adamw": 2 * params, "ema": params}
    out["total"] = sum(out.values())
    return out


def check_training_state_bytes(fn) -> None:
    """Exercise 8.3: ``fn(num_params)`` -> dict of int bytes: params, grads, adamw, ema, total (fp32)."""
    ex = TRAINING_STATE
    for P in (675_129_632, 33_000, 7):
        got = checks.call(ex, fn, P)
        if not isinstance(got, dict):
            checks.fail(ex, f"return a dict with the keys {', '.join(KEYS)}, got {type(got).__name__}.")
        missing = [k for k in KEYS if k not in got]
        if missing:
            checks.fail(ex, f"the dict lacks {', '.join(missing)} (keys: {', '.join(KEYS)}).")
        for k in KEYS:
            if not isinstance(got[k], int) or isinstance(got[k], bool):
                checks.fail(ex, f"{k}: return a whole number of bytes as a Python int, got {type(got[k]).__name__}.")
        expected = reference_state_bytes(P)
        for k in KEYS[:-1]:
            g, e = got[k], expected[k]
            if g == e:
                continue
            hint = {
                e // 4: "you counted values, not bytes: each float32 value takes 4 bytes.",
                e // 2: "you counted 2 bytes a value: the recipe keeps these in float32 (4 bytes), "
                "even when the forward pass runs in bf16.",
            }.get(g, "")
            if k == "adamw" and g in (4 * P, P, 2 * P):
                hint = "AdamW keeps TWO tensors per parameter (the first and second moments, exp_avg and exp_avg_sq)."
            if k == "ema" and g == 0:
                hint = "the EMA model is a full fp32 copy of the weights, kept on the device during training."
            checks.fail(ex, f"{k} = {g} bytes for {P} parameters, expected a different number. {hint}".rstrip())
        if got["total"] != expected["total"]:
            checks.fail(ex, f"total = {got['total']}: it is the sum of the four parts above.")
    checks.passed(ex)
