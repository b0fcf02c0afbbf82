"""The checks of lesson 08 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand (the LDM estimate, the reparametrised
sample, the byte counts), not taken from minidit.vae, so a check that compared minidit with itself
would not pass these tests.
"""

import pytest
import torch
from exercises import assert_fails, assert_passes, stub

from minidit.course import lesson08

SD_SCALE = 0.18215


# --------------------------------------------------------------------------
# 8.1 (scale_factor)
# --------------------------------------------------------------------------

SCALE_FACTOR = "8.1 (scale_factor)"


def test_scale_factor_solution_passes(capsys):
    assert_passes(lesson08.check_scale_factor, lambda z: float(1 / z.flatten().std()), SCALE_FACTOR, capsys)


def test_scale_factor_without_flatten_passes(capsys):
    """torch's std over all dimensions is the std of the flattened tensor: equally right."""
    assert_passes(lesson08.check_scale_factor, lambda z: 1.0 / z.std().item(), SCALE_FACTOR, capsys)


def test_scale_factor_stub_fails():
    assert_fails(lesson08.check_scale_factor, stub, SCALE_FACTOR, "not implemented yet")


@pytest.mark.parametrize(
    "fn, hint",
    [
        (lambda z: float(z.std()), "INVERSE"),
        (lambda z: float(1 / z.var()), "divided by the variance"),
        (lambda z: float(1 / z.std(correction=0)), "Bessel-corrected"),
        (lambda z: float(1 / z.pow(2).mean().sqrt()), "root mean square"),
        (lambda z: float(1 / (z - z.mean()).abs().mean()), "mean absolute deviation"),
        (lambda z: 1 / z.transpose(0, 1).flatten(1).std(1), "one per channel"),
        (lambda z: 1 / z.flatten().std(), "return a Python float"),
        (lambda z: 1 / z.flatten().std().numpy(), "return a Python float"),
        (lambda z: z.mul_(2) and float(1 / z.std()), "in place"),
        (lambda z: SD_SCALE, "expected"),
    ],
    ids=["std", "variance", "biased", "rms", "mad", "per-channel", "tensor", "numpy", "in-place", "constant"],
)
def test_scale_factor_mistakes_rejected(fn, hint):
    assert_fails(lesson08.check_scale_factor, fn, SCALE_FACTOR, hint)


# --------------------------------------------------------------------------
# 8.2 (sample_posterior)
# --------------------------------------------------------------------------

SAMPLE_POSTERIOR = "8.2 (sample_posterior)"


def sample(mean, std, generator, scale=SD_SCALE, mode="right"):
    """The right answer; ``mode`` switches on one mistake."""
    if mode == "global":
        eps = torch.randn(mean.shape)
    elif mode == "shared":
        eps = torch.randn(mean.shape[1:], generator=generator)
    elif mode == "extra_draw":
        torch.randn(1, generator=generator)
        eps = torch.randn(mean.shape, generator=generator)
    elif mode == "draw_after":
        eps = torch.randn(mean.shape, generator=generator)
        torch.rand(1, generator=generator)
    elif mode == "per_image":  # one draw per image, in batch order: the numbers of one draw of the batch when an
        # image has a multiple of 16 elements (torch fills large draws 16 at a time), as every latent here does
        eps = torch.stack([torch.randn(mean.shape[1:], generator=generator) for _ in range(len(mean))])
    elif mode == "double":
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    else:
        eps = torch.randn(mean.shape, generator=generator)
    if mode == "mean_only_scaled":
        return mean * scale + std * eps
    if mode == "variance":
        return (mean + std**2 * eps) * scale
    if mode == "sqrt":
        return (mean + std.sqrt() * eps) * scale
    if mode == "mean":
        return mean * scale
    return (mean + std * eps) * scale


def test_sample_posterior_solution_passes(capsys):
    assert_passes(lesson08.check_sample_posterior, sample, SAMPLE_POSTERIOR, capsys)


def test_sample_posterior_one_draw_per_image_passes(capsys):
    assert_passes(
        lesson08.check_sample_posterior, lambda m, s, g: sample(m, s, g, mode="per_image"), SAMPLE_POSTERIOR, capsys
    )


def test_sample_posterior_stub_fails():
    assert_fails(lesson08.check_sample_posterior, stub, SAMPLE_POSTERIOR, "not implemented yet")


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({"scale": 1.0}, "forgot the scale factor"),
        ({"scale": 1 / SD_SCALE}, "divided by the scale factor"),
        ({"mode": "mean_only_scaled"}, "scaled only the mean"),
        ({"mode": "variance"}, "by the variance"),
        ({"mode": "sqrt"}, "square root of std"),
        ({"mode": "mean"}, "posterior mean"),
        ({"mode": "shared"}, "same noise"),
        ({"mode": "global"}, "global random state"),
        ({"mode": "extra_draw"}, "differ from (mean + std * eps) * SCALE"),
        ({"mode": "draw_after"}, "generator moved on"),
        ({"mode": "double"}, "float32"),
    ],
    ids=[
        "no-scale",
        "divided",
        "mean-only",
        "variance",
        "sqrt",
        "mean",
        "shared",
        "global",
        "extra",
        "after",
        "f64",
    ],
)
def test_sample_posterior_mistakes_rejected(kwargs, hint):
    assert_fails(lesson08.check_sample_posterior, lambda m, s, g: sample(m, s, g, **kwargs), SAMPLE_POSTERIOR, hint)


def test_sample_posterior_in_place_rejected():
    def in_place(mean, std, generator):
        return mean.add_(std * torch.randn(mean.shape, generator=generator)).mul_(SD_SCALE)

    assert_fails(lesson08.check_sample_posterior, in_place, SAMPLE_POSTERIOR, "in place")


# --------------------------------------------------------------------------
# 8.3 (training_state_bytes)
# --------------------------------------------------------------------------

TRAINING_STATE = "8.3 (training_state_bytes)"


def state_bytes(P, per_value=4, adam_states=2, ema=True, total_without_ema=False, as_float=False):
    """The right answer; each keyword switches on one mistake."""
    out = {"params": per_value * P, "grads": per_value * P, "adamw": adam_states * per_value * P,
           "ema": per_value * P if ema else 0}  # fmt: skip
    out["total"] = sum(v for k, v in out.items() if not (total_without_ema and k == "ema"))
    return {k: float(v) for k, v in out.items()} if as_float else out


def test_training_state_solution_passes(capsys):
    assert_passes(lesson08.check_training_state_bytes, state_bytes, TRAINING_STATE, capsys)


def test_training_state_stub_fails():
    assert_fails(lesson08.check_training_state_bytes, stub, TRAINING_STATE, "not implemented yet")


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({"per_value": 1}, "values, not bytes"),
        ({"per_value": 2}, "2 bytes a value"),
        ({"adam_states": 1}, "TWO tensors per parameter"),
        ({"ema": False}, "full fp32 copy"),
        ({"total_without_ema": True}, "sum of the four parts"),
        ({"as_float": True}, "Python int"),
    ],
    ids=["values", "bf16", "one-adam-state", "no-ema", "total", "float"],
)
def test_training_state_mistakes_rejected(kwargs, hint):
    assert_fails(lesson08.check_training_state_bytes, lambda P: state_bytes(P, **kwargs), TRAINING_STATE, hint)


def test_training_state_missing_key_rejected():
    assert_fails(lesson08.check_training_state_bytes, lambda P: {"params": 4 * P}, TRAINING_STATE, "lacks grads")
