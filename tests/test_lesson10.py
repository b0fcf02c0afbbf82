"""The checks of lesson 10 are real: the right answers pass, stubs fail, and plausible mistakes are
rejected with a hint that names them."""

import functools
import math

import numpy as np
import pytest
import torch

from minidit.course import lesson10
from minidit.stats import model_stats as _model_stats

model_stats = functools.cache(_model_stats)  # the wrong answers below count the same models again and again


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: replace this line with your code")


# --------------------------------------------------------------------------
# 10.1 (num_tokens)
# --------------------------------------------------------------------------


def num_tokens(image_size, patch_size, downsample=8):
    if image_size % downsample:
        raise ValueError("no whole latent")
    latent = image_size // downsample
    if latent % patch_size:
        raise ValueError("no whole number of patches")
    return (latent // patch_size) ** 2


def num_tokens_grid(image_size, patch_size, downsample=8):  # another right answer: count the grid
    if image_size % downsample or (image_size // downsample) % patch_size:
        raise ValueError("does not split")
    side = len(range(0, image_size // downsample, patch_size))
    return side * side


def tokens_with(mistake):
    def fn(image_size, patch_size, downsample=8):
        if mistake != "no ValueError" and (image_size % downsample or (image_size // downsample) % patch_size):
            raise ValueError("does not split")
        latent = image_size // downsample
        return {
            "the image, not the latent": (image_size // patch_size) ** 2,
            "not squared": latent // patch_size,
            "p not squared": latent**2 // patch_size,
            "no patches": latent**2,
            "float": (latent / patch_size) ** 2,
            "numpy int": np.int64((latent // patch_size) ** 2),
            "tensor": torch.tensor((latent // patch_size) ** 2),
            "no ValueError": (latent // patch_size) ** 2,
        }[mistake]

    return fn


def tokens_default_downsample_1(image_size, patch_size, downsample=1):  # the default must be the SD VAE's 8
    return num_tokens(image_size, patch_size, downsample)


TOKEN_MISTAKES = {
    "the image, not the latent": "you patchified the 256 px image itself",
    "not squared": "the number of patches along one side",
    "p not squared": "the area by p squared",
    "no patches": "the number of latent pixels",
    "float": "a token count is an int; `/` makes floats",
    "numpy int": "return a Python int (int(...))",
    "tensor": "got a torch.Tensor",
    "no ValueError": "raise ValueError",
}


@pytest.mark.parametrize("fn", [num_tokens, num_tokens_grid])
def test_num_tokens_right_answers_pass(fn, capsys):
    lesson10.check_num_tokens(fn)
    assert capsys.readouterr().out == "✅ Exercise 10.1 (num_tokens) passed\n"


def test_num_tokens_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 10\.1 \(num_tokens\): not implemented yet"):
        lesson10.check_num_tokens(stub)


@pytest.mark.parametrize("mistake", TOKEN_MISTAKES)
def test_num_tokens_mistakes_are_named(mistake):
    with pytest.raises(AssertionError, match=r"Exercise 10\.1 \(num_tokens\)") as err:
        lesson10.check_num_tokens(tokens_with(mistake))
    assert TOKEN_MISTAKES[mistake] in str(err.value), str(err.value)


def test_num_tokens_default_downsample_is_checked():
    with pytest.raises(AssertionError, match=r"image 256 px, p = 4, downsample 8: got T = 4096, expected 64") as err:
        lesson10.check_num_tokens(tokens_default_downsample_1)
    assert "you patchified the 256 px image itself" in str(err.value)


def test_num_tokens_reference_is_the_patch_embedding():
    assert lesson10._ref_tokens(256, 2, 8) == 256 and lesson10._ref_tokens(16, 8, 1) == 4
    assert lesson10._ref_tokens(256, 3, 8) is None and lesson10._ref_tokens(20, 2, 8) is None


# --------------------------------------------------------------------------
# 10.2 (training_compute)
# --------------------------------------------------------------------------


def training_compute(model, steps, batch_size=256, image_size=256):
    return model_stats(model, input_size=image_size // 8).gmacs * 3 * batch_size * steps


def compute_with(mistake):
    def fn(model, steps, batch_size=256, image_size=256):
        latent = image_size // 8
        s = model_stats(model, input_size=image_size if mistake == "pixels" else latent)
        if mistake == "latent always 32":
            s = model_stats(model)
        return {
            "FLOPs": s.gflops * 3 * batch_size * steps,
            "train_gflops": s.train_gflops * batch_size * steps,
            "train_gflops times 3": s.train_gflops * 3 * batch_size * steps,
            "no factor 3": s.gmacs * batch_size * steps,
            "factor 2": s.gmacs * 2 * batch_size * steps,
            "no batch": s.gmacs * 3 * steps,
            "pixels": s.gmacs * 3 * batch_size * steps,
            "latent always 32": s.gmacs * 3 * batch_size * steps,
            "tensor": torch.tensor(s.gmacs * 3 * batch_size * steps),
            "numpy array": np.array([s.gmacs * 3 * batch_size * steps]),
        }[mistake]

    return fn


COMPUTE_MISTAKES = {
    "FLOPs": "you counted FLOPs (ModelStats.gflops and .train_gflops count 2 per MAC)",
    "train_gflops": "you counted FLOPs (ModelStats.gflops and .train_gflops count 2 per MAC)",
    "train_gflops times 3": "ModelStats.train_gflops already includes the factor 3",
    "no factor 3": "a training step costs about 3",
    "factor 2": "you counted 2 forwards per training image",
    "no batch": "every step trains a batch of batch_size",
    "pixels": "you ran the DiT on a 256 x 256 input",
    "latent always 32": "you used the 256 px latent (32 x 32) whatever the image size",
    "tensor": "is a torch.Tensor",
    "numpy array": "is a numpy array",
}


def test_training_compute_right_answer_passes(capsys):
    lesson10.check_training_compute(training_compute)
    assert capsys.readouterr().out == "✅ Exercise 10.2 (training_compute) passed\n"


def test_training_compute_matches_the_papers_table():
    """XL/2 at 400K steps of batch 256: 118.6 Gflops (the paper's table) x 3 x 256 x 400K."""
    assert lesson10.reference_training_compute("DiT-XL/2", 400_000) == pytest.approx(118.64 * 3 * 256 * 400_000, 1e-3)


def test_training_compute_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 10\.2 \(training_compute\): not implemented yet"):
        lesson10.check_training_compute(stub)


@pytest.mark.parametrize("mistake", COMPUTE_MISTAKES)
def test_training_compute_mistakes_are_named(mistake):
    with pytest.raises(AssertionError, match=r"Exercise 10\.2 \(training_compute\)") as err:
        lesson10.check_training_compute(compute_with(mistake))
    assert COMPUTE_MISTAKES[mistake] in str(err.value), str(err.value)


# --------------------------------------------------------------------------
# 10.3 (fit_power_law)
# --------------------------------------------------------------------------


def fit_power_law(x, y):
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def fit_power_law_normal_equations(x, y):  # another right answer: the closed form, in log10
    lx, ly = np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float))
    b = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    return 10 ** (ly.mean() - b * lx.mean()), b


def fit_power_law_torch(x, y):  # another right answer: torch's least squares, converted back to floats
    lx = torch.log(torch.as_tensor(np.asarray(x, float)))
    A = torch.stack([torch.ones_like(lx), lx], dim=1)
    sol = torch.linalg.lstsq(A, torch.log(torch.as_tensor(np.asarray(y, float)))[:, None]).solution
    return math.exp(sol[0, 0].item()), sol[1, 0].item()


def fit_with(mistake):
    def fn(x, y):
        lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
        slope, intercept = np.polyfit(lx, ly, 1)
        if mistake == "swapped":
            return float(slope), float(np.exp(intercept))
        if mistake == "polyfit unpacked backwards":
            log_a, b = np.polyfit(lx, ly, 1)
            return float(np.exp(log_a)), float(b)
        if mistake == "log a":
            return float(intercept), float(slope)
        if mistake == "log10 undone with exp":
            b, log10_a = np.polyfit(np.log10(x), np.log10(y), 1)
            return float(np.exp(log10_a)), float(b)
        if mistake == "ln undone with 10**":
            return float(10**intercept), float(slope)
        if mistake == "linear space":
            b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
            return float(a), float(b)
        if mistake == "log x on log y":
            c, e = np.polyfit(ly, lx, 1)
            return float(np.exp(-e / c)), float(1 / c)
        if mistake == "numpy array":
            return np.array([np.exp(intercept), slope])
        if mistake == "tensor pair":
            return torch.tensor(np.exp(intercept)), torch.tensor(slope)
        if mistake == "list":
            return [float(np.exp(intercept)), float(slope)]
        if mistake == "in place":
            if isinstance(x, np.ndarray):
                np.log(x, out=x)
                return fit_power_law(np.exp(x), y)
            return fit_power_law(x, y)
        raise ValueError(mistake)

    return fn


FIT_MISTAKES = {
    "swapped": "you returned (b, a)",
    "polyfit unpacked backwards": "np.polyfit returns the highest power first",
    "log a": "you returned log a",
    "log10 undone with exp": "you fitted in log10 and undid it with exp",
    "ln undone with 10**": "undo ln with exp",
    "linear space": "a straight line fitted to y against x",
    "log x on log y": "you regressed log x on log y",
    "numpy array": "got a ndarray: return a tuple (a, b) of two Python floats",
    "tensor pair": "a of the pair is a torch.Tensor",
    "list": "return a tuple (a, b) of two floats, got list",
    "in place": "changed its input x or y in place",
}


@pytest.mark.parametrize("fn", [fit_power_law, fit_power_law_normal_equations, fit_power_law_torch])
def test_fit_power_law_right_answers_pass(fn, capsys):
    lesson10.check_fit_power_law(fn)
    assert capsys.readouterr().out == "✅ Exercise 10.3 (fit_power_law) passed\n"


def test_fit_power_law_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 10\.3 \(fit_power_law\): not implemented yet"):
        lesson10.check_fit_power_law(stub)


@pytest.mark.parametrize("mistake", FIT_MISTAKES)
def test_fit_power_law_mistakes_are_named(mistake):
    with pytest.raises(AssertionError, match=r"Exercise 10\.3 \(fit_power_law\)") as err:
        lesson10.check_fit_power_law(fit_with(mistake))
    assert FIT_MISTAKES[mistake] in str(err.value), str(err.value)


def test_fit_power_law_failure_states_the_tolerance():
    with pytest.raises(AssertionError) as err:
        lesson10.check_fit_power_law(fit_with("log10 undone with exp"))
    assert "relative error up to 1e-6 allowed" in str(err.value)


# --------------------------------------------------------------------------
# 10.4 (spearman)
# --------------------------------------------------------------------------


def spearman(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_formula(x, y):  # another right answer: 1 - 6 sum d^2 / (n (n^2 - 1)), 1-based ranks
    n = len(x)
    d = (np.argsort(np.argsort(x)) + 1) - (np.argsort(np.argsort(y)) + 1)
    return 1 - 6 * float((d**2).sum()) / (n * (n**2 - 1))


def spearman_scipy(x, y):
    from scipy.stats import spearmanr

    return spearmanr(x, y).statistic


def spearman_with(mistake):
    def fn(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        if mistake == "pearson":
            return float(np.corrcoef(x, y)[0, 1])
        if mistake == "pearson of logs":
            return float(np.corrcoef(np.log(x), np.log(y))[0, 1])
        if mistake == "argsort once":
            return float(np.corrcoef(np.argsort(x), np.argsort(y))[0, 1])
        if mistake == "only x ranked":
            return float(np.corrcoef(np.argsort(np.argsort(x)), y)[0, 1])
        if mistake == "scipy result object":
            from scipy.stats import spearmanr

            return spearmanr(x, y)
        if mistake == "kendall":
            from scipy.stats import kendalltau

            return float(kendalltau(x, y).statistic)
        if mistake == "tensor":
            return torch.tensor(spearman(x, y))
        if mistake == "sign flipped":
            return -spearman(x, y)
        raise ValueError(mistake)

    return fn


SPEARMAN_MISTAKES = {
    "pearson": "Pearson's correlation of the values",
    "pearson of logs": "Pearson's correlation of the logs",
    "argsort once": "np.argsort gives the order",
    "only x ranked": "rank both x and y",
    "scipy result object": "return its .statistic",
    "kendall": "that is Kendall's tau",
    "tensor": "is a torch.Tensor",
    "sign flipped": "expected",
}


@pytest.mark.parametrize("fn", [spearman, spearman_formula, spearman_scipy])
def test_spearman_right_answers_pass(fn, capsys):
    lesson10.check_spearman(fn)
    assert capsys.readouterr().out == "✅ Exercise 10.4 (spearman) passed\n"


def test_spearman_stub_fails():
    with pytest.raises(AssertionError, match=r"Exercise 10\.4 \(spearman\): not implemented yet"):
        lesson10.check_spearman(stub)


@pytest.mark.parametrize("mistake", SPEARMAN_MISTAKES)
def test_spearman_mistakes_are_named(mistake):
    with pytest.raises(AssertionError, match=r"Exercise 10\.4 \(spearman\)") as err:
        lesson10.check_spearman(spearman_with(mistake))
    assert SPEARMAN_MISTAKES[mistake] in str(err.value), str(err.value)


def test_kendall_tau_helper_matches_scipy():
    from scipy.stats import kendalltau

    for x, y in lesson10._spearman_cases():
        assert lesson10._kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
