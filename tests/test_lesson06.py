"""The checks of lesson 06 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand (the seeding rule, the draw order, the
step, the EMA, the interleaved positions), not taken from minidit.train, so a check that compared
minidit with itself would not pass these tests.
"""

import copy

import pytest
import torch
from exercises import assert_fails, assert_passes, stub

from minidit import toy
from minidit.course import lesson06
from minidit.runtime import Dist
from minidit.train import ToyBatches

# --------------------------------------------------------------------------
# 6.1 (step_noise)
# --------------------------------------------------------------------------

STEP_NOISE = "6.1 (step_noise)"


def step_noise(seed, step, B, shape, T, p_drop, key=None, t_lo=0, order="tnd", coin="lt", generator=True,
               t_dtype=None, drop_bool=False):  # fmt: skip
    """The right answer; each keyword switches on one mistake."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step if key is None else key(seed, step))
    kw = {"generator": g} if generator else {}
    out = {}
    for what in order:
        if what == "t":
            out["t"] = torch.randint(t_lo, T + t_lo, (B,), **kw) if t_dtype is None else torch.rand(B, **kw) * T
        elif what == "n":
            out["n"] = torch.randn((B, *shape), **kw)
        else:
            if coin == "bernoulli":
                d = torch.bernoulli(torch.full((B,), p_drop), **kw).bool()
            else:
                u = torch.rand(B, **kw)
                d = u < p_drop if coin == "lt" else u > p_drop
            out["d"] = d if drop_bool else d.long()
    return out["t"], out["n"], out["d"]


def test_step_noise_solution_passes(capsys):
    assert_passes(lesson06.check_step_noise, step_noise, STEP_NOISE, capsys)


def test_step_noise_bernoulli_passes(capsys):
    """torch.bernoulli(p) with the generator draws the same coins as torch.rand(B) < p on the CPU: equally right."""
    assert_passes(lesson06.check_step_noise, lambda *a: step_noise(*a, coin="bernoulli"), STEP_NOISE, capsys)


def test_step_noise_stub_fails():
    assert_fails(lesson06.check_step_noise, stub, STEP_NOISE, "not implemented yet")


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        (dict(t_lo=1), "your t runs 1..T"),
        (dict(t_dtype="float"), "t is an integer step index"),
        (dict(order="ntd"), "you drew the noise before t"),
        (dict(order="tdn"), "you drew the drop coins before the noise"),
        (dict(coin="gt"), "probability 1 - p_drop"),
        (dict(key=lambda seed, step: step), "seeded with the step alone"),
        (dict(generator=False), "torch's global random state"),
        (dict(key=lambda seed, step: seed), "seeded with the seed alone"),
        (dict(key=lambda seed, step: seed + step), "seeded with seed + step"),
        (dict(drop_bool=True), "drop is the model's force_drop_ids: int64"),
    ],
)
def test_step_noise_mistakes(kwargs, hint):
    assert_fails(lesson06.check_step_noise, lambda *a: step_noise(*a, **kwargs), STEP_NOISE, hint)


# --------------------------------------------------------------------------
# 6.2 (train_step)
# --------------------------------------------------------------------------

TRAIN_STEP = "6.2 (train_step)"


def train_step(model, diffusion, opt, x_0, y, t, noise, drop, which=("mse", "vb"), reduce="mean", zero=True,
               pass_noise=True, pass_drop=True, detach=True, item=False, zero_before_step=False):  # fmt: skip
    """The right answer (zero_grad first, then backward and step); each keyword switches on one mistake."""
    if zero:
        opt.zero_grad()
    kwargs = dict(y=y, force_drop_ids=drop) if pass_drop else dict(y=y)
    losses = diffusion.training_losses(model, x_0, t, model_kwargs=kwargs, noise=noise if pass_noise else None)
    per_image = sum(losses[k] for k in which)
    loss = per_image.mean() if reduce == "mean" else per_image.sum()
    loss.backward()
    if zero_before_step:
        opt.zero_grad()
    opt.step()
    if item:
        return loss.item()
    return loss.detach() if detach else loss


def test_train_step_solution_passes(capsys):
    assert_passes(lesson06.check_train_step, train_step, TRAIN_STEP, capsys)


def test_train_step_stub_fails():
    assert_fails(lesson06.check_train_step, stub, TRAIN_STEP, "not implemented yet")


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        (dict(which=("mse",)), "the VB term is gone"),
        (dict(which=("vb",)), "the VB term alone"),
        (dict(reduce="sum"), "you summed the per-image losses"),
        (dict(zero=False), "used the first step's gradients too"),
        (dict(pass_noise=False), "torch's global random state"),
        (dict(pass_drop=False), "torch's global random state"),
        (dict(detach=False), "return loss.detach()"),
        (dict(item=True), "not a Python float"),
        (dict(zero_before_step=True), "the parameters did not change"),
    ],
)
def test_train_step_mistakes(kwargs, hint):
    assert_fails(lesson06.check_train_step, lambda *a: train_step(*a, **kwargs), TRAIN_STEP, hint)


# --------------------------------------------------------------------------
# 6.3 (update_ema)
# --------------------------------------------------------------------------

EMA = "6.3 (update_ema)"


def update_ema(ema, model, decay):
    """The right answer, written out: only the parameters that train."""
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            if m.requires_grad:
                e.mul_(decay).add_(m, alpha=1 - decay)


def ema_swapped(ema, model, decay):
    update_ema(ema, model, 1 - decay)


def ema_all_params(ema, model, decay):
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(m, alpha=1 - decay)


def ema_state_dict(ema, model, decay):
    """Averages through the state dict: the frozen pos_embed too."""
    sd = ema.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            sd[k].mul_(decay).add_(v, alpha=1 - decay)


def ema_of_grads(ema, model, decay):
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            if m.requires_grad:
                e.mul_(decay).add_(m.grad, alpha=1 - decay)


def ema_new_model(ema, model, decay):
    ema = copy.deepcopy(ema)
    update_ema(ema, model, decay)
    return ema


def ema_updates_model(ema, model, decay):
    with torch.no_grad():  # the average lands in the model
        for e, m in zip(ema.parameters(), model.parameters()):
            if m.requires_grad:
                m.mul_(1 - decay).add_(e, alpha=decay)


def ema_no_grad_missing(ema, model, decay):
    for e, m in zip(ema.parameters(), model.parameters()):
        if m.requires_grad:
            e.copy_(decay * e + (1 - decay) * m)


def ema_copies(ema, model, decay):
    update_ema(ema, model, 0.0)


def test_update_ema_solution_passes(capsys):
    assert_passes(lesson06.check_update_ema, update_ema, EMA, capsys)


def test_update_ema_stub_fails():
    assert_fails(lesson06.check_update_ema, stub, EMA, "not implemented yet")


@pytest.mark.parametrize(
    "fn, hint",
    [
        (ema_swapped, "decay and 1 - decay are swapped"),
        (ema_all_params, "you changed the EMA's pos_embed"),
        (ema_state_dict, "you changed the EMA's pos_embed"),
        (ema_of_grads, "you averaged the GRADIENTS"),
        (ema_new_model, "you returned a new model"),
        (ema_updates_model, "you changed the MODEL's weights"),
        (ema_no_grad_missing, "torch.no_grad()"),
        (ema_copies, "became a copy of the model"),
    ],
)
def test_update_ema_mistakes(fn, hint):
    assert_fails(lesson06.check_update_ema, fn, EMA, hint)


# --------------------------------------------------------------------------
# 6.4 (process_images)
# --------------------------------------------------------------------------

IMAGES = "6.4 (process_images)"


def process_images(step, rank, world_size, global_batch, micro, mistake=None):
    """The right answer: step s renders images s*G ... s*G + G - 1; position p of the global batch goes to
    process p mod W, micro-step after micro-step. Each ``mistake`` is a plausible wrong answer."""
    G, W, r = global_batch, world_size, rank
    accum = G // (micro * W)
    a = torch.arange(accum)[:, None]
    i = torch.arange(micro)[None, :]
    if mistake == "contiguous":
        return step * G + r * (G // W) + a * micro + i
    if mistake == "swapped":
        return step * G + (a * micro + i) * r + W
    if mistake == "step+1":
        return (step + 1) * G + (a * micro + i) * W + r
    if mistake == "no_accum":
        return (step * G + i * W + r).expand(accum, -1)
    if mistake == "flat":
        return (step * G + (a * micro + i) * W + r).flatten()
    if mistake == "int32":
        return (step * G + (a * micro + i) * W + r).int()
    return step * G + (a * micro + i) * W + r


def test_process_images_solution_passes(capsys):
    assert_passes(lesson06.check_process_images, process_images, IMAGES, capsys)


def test_process_images_stub_fails():
    assert_fails(lesson06.check_process_images, stub, IMAGES, "not implemented yet")


@pytest.mark.parametrize(
    "mistake, hint",
    [
        ("contiguous", "your positions are contiguous"),
        ("swapped", "rank and world size are swapped"),
        ("step+1", "off by one step"),
        ("no_accum", "every micro-step would see the same images"),
        ("flat", "return one row per micro-step"),
        ("int32", "image indices are int64"),
    ],
)
def test_process_images_mistakes(mistake, hint):
    assert_fails(lesson06.check_process_images, lambda *a: process_images(*a, mistake=mistake), IMAGES, hint)


def test_process_images_is_what_the_trainer_renders():
    """The hand-written answer renders the very images ToyBatches yields (the check's ground truth)."""
    from types import SimpleNamespace

    step, W, G, micro = 3, 4, 32, 2
    cfg = SimpleNamespace(global_batch_size=G, seed=0, image_size=8)
    for rank in range(W):
        batches = iter(ToyBatches(cfg, Dist(rank, rank, W), micro, G // (micro * W), step))
        for row in process_images(step, rank, W, G, micro):
            assert torch.equal(next(batches)[0], toy.make_batch(row, seed=0, image_size=8)[0])
