"""Checks for lesson 10: scaling, measured at toy scale (tokens, training compute, power-law fits, rank correlation).

Each ``check_<name>(fn)`` calls the learner's function on fixed inputs, compares it with the reference in
``minidit`` (``minidit.embed.PatchEmbed``, ``minidit.stats.model_stats``, ``minidit.scaling``), prints one line
on success, or raises ``AssertionError`` naming the likely mistake (found by comparing with known wrong variants).
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from minidit.embed import PatchEmbed
from minidit.scaling import fit_power_law as _ref_fit_power_law
from minidit.scaling import spearman as _ref_spearman
from minidit.stats import model_stats

from . import checks


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(b), 1e-300)


def _expect_number(ex: str, got, what: str) -> float:
    """A real number (int, float, numpy float64 is a float); a tensor or an array is named."""
    if isinstance(got, torch.Tensor):
        checks.fail(ex, f"{what} is a torch.Tensor: return a Python number (.item() gives one).")
    if isinstance(got, np.ndarray):
        checks.fail(ex, f"{what} is a numpy array of shape {got.shape}: return a Python float (float(...)).")
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        checks.fail(ex, f"{what} should be a number, got {type(got).__name__}.")
    return float(got)


# --------------------------------------------------------------------------
# Exercise 10.1 (num_tokens)
# --------------------------------------------------------------------------

TOKENS = "10.1 (num_tokens)"


def _ref_tokens(image_size: int, patch_size: int, downsample: int) -> int | None:
    """T of a DiT on images of ``image_size`` px seen through an encoder that downsamples by ``downsample``
    (the reference's patch embedding, built on the meta device); None where the image does not split."""
    if image_size % downsample:
        return None
    try:
        with torch.device("meta"):
            return PatchEmbed(image_size // downsample, patch_size, 4, 8).num_patches
    except ValueError:
        return None


def _tokens_hint(got: int, image_size: int, patch_size: int, downsample: int) -> str:
    latent, p = image_size // downsample, patch_size
    known = [
        ((image_size // p) ** 2, f"you patchified the {image_size} px image itself: the DiT sees the latent, "
         f"{downsample}x smaller ({latent} x {latent}), and cuts that into p x p patches."),
        (latent // p, "that is the number of patches along one side: the patches tile a 2-D grid, so T is its "
         "square."),
        (latent**2 // p, "each token is a p x p patch, so each side is divided by p: the area by p squared."),
        (latent**2, "that is the number of latent pixels: each token covers a p x p patch of them."),
        (image_size**2 // p**2 // downsample, "the downsampling shrinks both sides of the image: the area by "
         "downsample squared."),
    ]  # fmt: skip
    for value, hint in known:
        if got == value:
            return hint
    return ""


def check_num_tokens(fn) -> None:
    """Exercise 10.1: ``fn(image_size, patch_size, downsample=8) -> int``; ValueError where the image does not split."""
    ex = TOKENS
    cases = [(256, 2, 8), (256, 8, 8), (512, 2, 8), (256, 4, None), (16, 2, 1), (16, 8, 1), (32, 1, 8), (96, 3, 4)]
    for image_size, patch_size, downsample in cases:
        if downsample is None:  # the default: the SD VAE's 8
            got = checks.call(ex, fn, image_size, patch_size)
            downsample = 8
        else:
            got = checks.call(ex, fn, image_size, patch_size, downsample)
        case = f"image {image_size} px, p = {patch_size}, downsample {downsample}"
        want = _ref_tokens(image_size, patch_size, downsample)
        if isinstance(got, torch.Tensor):
            checks.fail(ex, f"{case}: got a torch.Tensor: return a Python int (a token count).")
        if isinstance(got, float):
            checks.fail(ex, f"{case}: got the float {got!r}: a token count is an int; `/` makes floats, `//` ints.")
        if isinstance(got, np.integer):
            checks.fail(ex, f"{case}: got a numpy {type(got).__name__}: return a Python int (int(...)).")
        if isinstance(got, bool) or not isinstance(got, int):
            checks.fail(ex, f"{case}: should return an int, got {type(got).__name__}.")
        if got != want:
            hint = _tokens_hint(got, image_size, patch_size, downsample)
            checks.fail(ex, f"{case}: got T = {got}, expected {want}." + (f" {hint}" if hint else ""))

    def raises_value_error(*args):
        try:
            return fn(*args), False
        except ValueError:
            return None, True

    for image_size, patch_size, downsample, why in [
        (256, 3, 8, "the 32 x 32 latent is not a whole number of 3 x 3 patches"),
        (100, 2, 8, "100 px is not a multiple of the downsampling 8: there is no whole latent"),
        (20, 2, 8, "20 px is not a multiple of the downsampling 8 (20 // 8 = 2 would drop pixels)"),
        (16, 5, 1, "16 px is not a whole number of 5 x 5 patches"),
    ]:
        got, raised = checks.call(ex, raises_value_error, image_size, patch_size, downsample)
        if not raised:
            checks.fail(
                ex,
                f"image {image_size} px, p = {patch_size}, downsample {downsample}: returned {got!r}, but {why}: "
                "raise ValueError (the reference's patch embedding refuses such inputs instead of silently "
                "dropping the remainder).",
            )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 10.2 (training_compute)
# --------------------------------------------------------------------------

COMPUTE = "10.2 (training_compute)"


@functools.cache
def _gmacs(model: str, input_size: int) -> float:
    return model_stats(model, input_size=input_size).gmacs


def reference_training_compute(model: str, steps: int, batch_size: int = 256, image_size: int = 256) -> float:
    """The paper's estimate of training compute (section 5, Figure 9): forward Gflops · batch · steps · 3."""
    return _gmacs(model, image_size // 8) * 3 * batch_size * steps


def _compute_hint(got: float, model: str, steps: int, batch_size: int, image_size: int) -> str:
    want = reference_training_compute(model, steps, batch_size, image_size)
    per_step = _gmacs(model, image_size // 8) * batch_size * steps
    known = [
        (2 * want, "that is twice the answer: you counted FLOPs (ModelStats.gflops and .train_gflops count 2 per "
         "MAC). The paper's 'Gflops' are multiply-accumulates: ModelStats.gmacs."),
        (6 * want, "that is 6x the answer: ModelStats.train_gflops already includes the factor 3, and counts FLOPs "
         "(2 per MAC). The paper's Gflops are MACs: 3 x gmacs per training image."),
        (want / 3, "that is one forward pass per image: a training step costs about 3 (the backward pass is about "
         "twice the forward), so multiply by 3."),
        (2 * per_step, "you counted 2 forwards per training image: the backward pass is about twice the forward, "
         "so forward + backward is about 3 forwards."),
        (4 * per_step, "you counted 4 forwards per training image: forward + backward is about 3 forwards (the "
         "paper's factor)."),
        (want / batch_size, "that is the compute of one image per step: every step trains a batch of batch_size "
         "images."),
        (want / steps, "that is the compute of one step: multiply by the number of steps."),
        (3 * _gmacs(model, image_size // 8), "that is one training image: multiply by the batch size and the "
         "number of steps."),
    ]  # fmt: skip
    for value, hint in known:
        if _close(got, value, 1e-6):
            return hint
    if image_size != 256 and _close(got, _gmacs(model, 32) * 3 * batch_size * steps, 1e-6):
        return (f"you used the 256 px latent (32 x 32) whatever the image size: at {image_size} px the latent is "
                f"{image_size // 8} x {image_size // 8} (model_stats(..., input_size=...)).")  # fmt: skip
    for wrong in (image_size, image_size // 4, image_size // 16):
        if wrong != image_size // 8 and _close(got, _gmacs(model, wrong) * 3 * batch_size * steps, 1e-6):
            return (f"you ran the DiT on a {wrong} x {wrong} input: it sees the VAE's latent, {image_size} / 8 = "
                    f"{image_size // 8} px on a side.")  # fmt: skip
    return ""


def check_training_compute(fn) -> None:
    """Exercise 10.2: ``fn(model, steps, batch_size=256, image_size=256) -> float``, training Gflops (MACs)."""
    ex = COMPUTE
    cases = [("DiT-XL/2", 400_000, None, None), ("DiT-S/8", 400_000, None, None), ("DiT-B/4", 50_000, 32, 512),
             ("DiT-L/2", 3, 7, 256), ("DiT-XL/2", 7_000_000, 256, 256)]  # fmt: skip
    for model, steps, batch_size, image_size in cases:
        if batch_size is None:  # the defaults: batch 256 at 256 px, the paper's setting
            got = checks.call(ex, fn, model, steps)
            batch_size, image_size = 256, 256
        else:
            got = checks.call(ex, fn, model, steps, batch_size=batch_size, image_size=image_size)
        case = f"{model}, {steps:,} steps of batch {batch_size} at {image_size} px"
        got = _expect_number(ex, got, f"{case}: the result")
        want = reference_training_compute(model, steps, batch_size, image_size)
        if not _close(got, want, 1e-9):
            hint = _compute_hint(got, model, steps, batch_size, image_size)
            checks.fail(
                ex,
                f"{case}: got {got:.6g} Gflops, expected {want:.6g} (model_stats' forward GMACs x 3 x batch x "
                "steps; the check allows a relative error of 1e-9)." + (f" {hint}" if hint else ""),
            )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 10.3 (fit_power_law)
# --------------------------------------------------------------------------

POWER = "10.3 (fit_power_law)"


def _power_cases() -> list[tuple[object, object]]:
    rng = np.random.default_rng(103)
    g = np.geomspace(2e-3, 6e-2, 8)
    loss = 0.022 * g**-0.2 * np.exp(0.15 * rng.standard_normal(8))  # the toy sweep's trend, with scatter
    x2 = np.sort(rng.uniform(1, 1000, 12))
    y2 = 3.0 * x2**0.7 * np.exp(0.3 * rng.standard_normal(12))  # a growing law, wider scatter
    return [
        (g.tolist(), loss.tolist()),  # lists, as read from a results file
        (x2, y2),  # numpy arrays
        ([2.0, 8.0], [3.0, 12.0]),  # two points: the line through them, y = 1.5 x
        (np.array([0.01, 0.1, 1.0, 10.0]), np.array([5.0, 0.9, 0.4, 0.05])),
    ]


def _power_variants(x, y) -> list[tuple[tuple[float, float], str]]:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    b, log_a = np.polyfit(lx, ly, 1)
    b10, log10_a = np.polyfit(np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float)), 1)
    c, e = np.polyfit(ly, lx, 1)  # log x regressed on log y
    lin_b, lin_a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    a = math.exp(log_a)
    return [
        ((b, a), "you returned (b, a): the order is (a, b), for y = a * x**b."),
        ((math.exp(b), log_a), "np.polyfit returns the highest power first, [slope, intercept]: the slope is b, "
         "and the intercept is log a."),
        ((log_a, b), "you returned log a: a is the exponential of the intercept."),
        ((math.exp(log10_a), b10), "you fitted in log10 and undid it with exp: undo a log10 with 10 ** (or use "
         "the natural log throughout)."),
        ((10**log_a, b), "you fitted in natural log and undid it with 10 **: undo ln with exp."),
        ((math.exp(-e / c), 1 / c), "you regressed log x on log y: the least squares here are on log y, "
         "predicted from log x (log y = log a + b log x)."),
        ((lin_a, lin_b), "that is a straight line fitted to y against x: a power law is a straight line in "
         "log-log space, so fit log y against log x."),
        ((a, -b), "the exponent has the wrong sign."),
    ]  # fmt: skip


def check_fit_power_law(fn) -> None:
    """Exercise 10.3: ``fn(x, y) -> (a, b)`` of y ~= a x**b, least squares on log y = log a + b log x."""
    ex = POWER
    for x, y in _power_cases():
        x_before, y_before = np.array(x, dtype=float), np.array(y, dtype=float)
        got = checks.call(ex, fn, x, y)
        if not (np.array_equal(np.asarray(x, float), x_before) and np.array_equal(np.asarray(y, float), y_before)):
            checks.fail(ex, "your function changed its input x or y in place: work on copies (np.log makes one).")
        if isinstance(got, (torch.Tensor, np.ndarray)):
            checks.fail(ex, f"got a {type(got).__name__}: return a tuple (a, b) of two Python floats.")
        if not (isinstance(got, tuple) and len(got) == 2):
            checks.fail(ex, f"return a tuple (a, b) of two floats, got {type(got).__name__} {got!r:.60}.")
        a, b = (_expect_number(ex, v, f"{name} of the pair") for v, name in zip(got, ("a", "b")))
        want_a, want_b = _ref_fit_power_law(x, y)
        if not (_close(a, want_a, 1e-6) and _close(b, want_b, 1e-6)):
            hint = next((h for (va, vb), h in _power_variants(x, y) if _close(a, va, 1e-6) and _close(b, vb, 1e-6)),
                        "fit a straight line to log y against log x by least squares (np.polyfit of degree 1): "
                        "its slope is b, its intercept log a.")  # fmt: skip
            checks.fail(
                ex,
                f"on {len(x)} points got (a, b) = ({a:.6g}, {b:.6g}), expected ({want_a:.6g}, {want_b:.6g}) "
                f"(relative error up to 1e-6 allowed). {hint}",
            )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 10.4 (spearman)
# --------------------------------------------------------------------------

SPEARMAN = "10.4 (spearman)"


def _spearman_cases() -> list[tuple[object, object]]:
    rng = np.random.default_rng(104)
    x1 = rng.permutation(np.geomspace(1e-3, 1e-1, 8))
    y1 = 0.02 * x1**-0.2 * np.exp(0.2 * rng.standard_normal(8))
    x2 = rng.uniform(0.5, 5.0, 12)
    x3 = rng.permutation(np.arange(1, 11)).astype(float)
    return [
        (x1.tolist(), y1.tolist()),  # a noisy falling trend, lists
        (x2, np.exp(2 * x2)),  # monotone but curved: Spearman is exactly 1, Pearson is not
        (x3, x3**3 * rng.uniform(0.8, 1.2, 10)),
        (rng.permutation(np.arange(7.0)) + 1, rng.permutation(np.arange(7.0)) * 2 + 1),
    ]


def _rank(v) -> np.ndarray:
    return np.argsort(np.argsort(v))


def _kendall_tau(x, y) -> float:
    """Kendall's tau (no ties): the mean sign agreement of all pairs (scipy is only a dev dependency)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    return float(np.mean(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])))


def _spearman_variants(x, y) -> list[tuple[float, str]]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return [
        (float(np.corrcoef(x, y)[0, 1]), "that is Pearson's correlation of the values: Spearman's is Pearson's "
         "correlation of the ranks."),
        (float(np.corrcoef(np.log(x), np.log(y))[0, 1]), "that is Pearson's correlation of the logs: a rank "
         "correlation uses the ranks (0 for the smallest, 1 for the next, ...)."),
        (float(np.corrcoef(np.argsort(x), np.argsort(y))[0, 1]), "np.argsort gives the order (which element is "
         "smallest, next, ...), not the ranks: the rank of each element is the argsort of the argsort."),
        (float(np.corrcoef(_rank(x), y)[0, 1]), "rank both x and y."),
        (float(np.corrcoef(x, _rank(y))[0, 1]), "rank both x and y."),
    ]  # fmt: skip


def check_spearman(fn) -> None:
    """Exercise 10.4: ``fn(x, y) -> float``, Spearman's rank correlation (no ties)."""
    ex = SPEARMAN
    for x, y in _spearman_cases():
        got = checks.call(ex, fn, x, y)
        if type(got).__name__ in ("SignificanceResult", "SpearmanrResult"):
            checks.fail(ex, "scipy.stats.spearmanr returns a result object (statistic, pvalue): return its "
                        ".statistic, as a float.")  # fmt: skip
        got = _expect_number(ex, got, "the result")
        want = _ref_spearman(x, y)
        if not _close(got, want, 1e-9) and abs(got - want) > 1e-12:
            hint = next((h for v, h in _spearman_variants(x, y) if abs(got - v) <= 1e-9), "")
            if not hint and abs(got - _kendall_tau(x, y)) <= 1e-9:
                hint = "that is Kendall's tau, another rank correlation: Spearman's is Pearson's on the ranks."
            checks.fail(ex, f"on {len(x)} points got {got:.6g}, expected {want:.6g} (tolerance 1e-9). {hint}".rstrip())
    checks.passed(ex)
