"""Checks for lesson 06: a training loop that really learns.

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs and compares it with the
trainer in ``minidit.train`` (``Trainer.step_noise``, ``update_ema``, ``batch_positions``, ``ToyBatches``)
and ``minidit.diffusion.GaussianDiffusion.training_losses``: equal tensors where the trainer draws
random numbers (the same generator, the same order), float rounding elsewhere. On a mismatch the
check compares with known wrong variants to name the likely mistake.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from minidit import toy
from minidit.diffusion import GaussianDiffusion, create_diffusion
from minidit.model import DiT
from minidit.runtime import Dist
from minidit.train import ToyBatches, Trainer, batch_positions, update_ema

from . import checks


def _tiny_dit(seed: int, num_classes: int = 4) -> DiT:
    """A DiT small enough for a check: 8x8x3 inputs, patch 2 (16 tokens), D = 32, depth 2, 2 heads."""
    with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
        torch.manual_seed(seed)
        return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                   num_classes=num_classes, class_dropout_prob=0.1, learn_sigma=True)  # fmt: skip


def _global_rng_changes(ex: str, fn, args_fn, compare) -> None:
    """Call ``fn`` twice on fresh copies of its inputs under two different global seeds: a result that
    changes uses torch's global random state (no ``generator=``, or a draw left to the model)."""
    outs = []
    for seed in (1234, 98765):
        torch.manual_seed(seed)
        outs.append(checks.call(ex, fn, *args_fn()))
    if not compare(*outs):
        checks.fail(
            ex,
            "two calls with the same inputs gave different results: your code draws from torch's global random "
            "state somewhere. Every random number of a step must come from the inputs (the generator, or the "
            "t, noise and drop you are given), or a resumed run and W processes cannot reproduce it.",
        )


# --------------------------------------------------------------------------
# Exercise 6.1 (step_noise)
# --------------------------------------------------------------------------

STEP_NOISE = "6.1 (step_noise)"


def _trainer_draws(seed, step, B, shape, T, p_drop):
    """(t, noise, drop) exactly as ``Trainer.step_noise`` draws them for a global batch of B on the CPU."""
    C, H, W = shape
    if H != W:
        raise ValueError("the trainer's inputs are square")
    me = SimpleNamespace(
        cfg=SimpleNamespace(global_batch_size=B, seed=seed, class_dropout_prob=p_drop, hflip=False),
        spec=SimpleNamespace(in_channels=C, input_size=H, moments=False),
        device=torch.device("cpu"),
        diffusion=GaussianDiffusion(torch.full((T,), 0.01).double().numpy()),  # t's draw depends on T only
    )
    t, noise, drop, _, _ = Trainer.step_noise(me, step)
    return t, noise, drop


def _draw_variants(seed, step, B, shape, T, p_drop):
    """(t, noise, drop, hint) for wrong seeds, wrong orders and wrong distributions."""

    def draws(g_seed, order=("t", "noise", "drop"), t_lo=0, coin="lt"):
        g = torch.Generator().manual_seed(g_seed)
        out = {}
        for what in order:
            if what == "t":
                out["t"] = torch.randint(t_lo, T + t_lo, (B,), generator=g)
            elif what == "noise":
                out["noise"] = torch.randn((B, *shape), generator=g)
            else:
                u = torch.rand(B, generator=g)
                out["drop"] = {"lt": u < p_drop, "gt": u > p_drop, "gt1": u > 1 - p_drop}[coin].long()
        return out["t"], out["noise"], out["drop"]

    key = seed * 1_000_003 + step
    order_hint = "draw in the trainer's order: t first, then the noise, then the drop coins (one generator)."
    return [
        (draws(key, t_lo=1), "your t runs 1..T: the code and the model count the steps 0..T-1 (the DDPM paper's "
         "t = 1 is our t = 0), so draw torch.randint(0, T, ...), T excluded."),
        (draws(key, ("noise", "t", "drop")), "you drew the noise before t: " + order_hint),
        (draws(key, ("t", "drop", "noise")), "you drew the drop coins before the noise: " + order_hint),
        (draws(key, ("drop", "t", "noise")), "wrong order: " + order_hint),
        (draws(key, coin="gt"), "your drop coins are 1 with probability 1 - p_drop: a label is dropped when its "
         "uniform number is BELOW p_drop."),
        (draws(key, coin="gt1"), "your coins drop a label when u > 1 - p_drop: the right rate, but not the "
         "reference's coins. Drop when u < p_drop, so every process and a resumed run agree."),
        (draws(seed), "your generator is seeded with the seed alone: every step would draw the same t and noise. "
         "Seed it with seed * 1_000_003 + step."),
        (draws(step), "your generator is seeded with the step alone: two runs with different seeds would "
         "share their noise. Seed it with seed * 1_000_003 + step."),
        (draws(seed + step), "your generator is seeded with seed + step: (seed 0, step 1) and (seed 1, step 0) "
         "would share their noise. Seed it with seed * 1_000_003 + step."),
    ]  # fmt: skip


def check_step_noise(fn) -> None:
    """Exercise 6.1: ``fn(seed, step, B, shape, T, p_drop)`` -> (t int64 [B] in 0..T-1,
    noise float32 [B, *shape], drop int64 [B] of 0/1), drawn as the trainer draws them."""
    ex = STEP_NOISE
    cases = [(0, 0, 64, (3, 4, 4), 1000, 0.1), (7, 123, 32, (4, 2, 2), 1000, 0.5), (3, 5, 16, (3, 2, 2), 50, 0.25)]
    for case in cases:
        seed, step, B, shape, T, p_drop = case
        _global_rng_changes(ex, fn, lambda case=case: case, lambda a, b: all(map(torch.equal, a, b)))
        got = checks.call(ex, fn, *case)
        if not isinstance(got, tuple) or len(got) != 3:
            checks.fail(ex, f"return the tuple (t, noise, drop), got {type(got).__name__}.")
        t, noise, drop = (checks.expect_tensor(ex, v, name) for v, name in zip(got, ("t", "noise", "drop")))
        checks.expect_shape(ex, t, (B,))
        checks.expect_shape(ex, noise, (B, *shape))
        checks.expect_shape(ex, drop, (B,))
        checks.expect_dtype(ex, t, torch.int64, "t is an integer step index (torch.randint), one per image: the "
                            "model embeds t and the diffusion looks its tables up with it.")  # fmt: skip
        checks.expect_dtype(ex, noise, torch.float32, "the noise is float32, like the images.")
        checks.expect_dtype(ex, drop, torch.int64, "drop is the model's force_drop_ids: int64, 1 = replace the "
                            "label by the null class (convert the boolean coins with .long()).")  # fmt: skip
        expected = _trainer_draws(*case)
        if all(map(torch.equal, (t, noise, drop), expected)):
            continue
        for variant, hint in _draw_variants(*case):
            if all(map(torch.equal, (t, noise, drop), variant)):
                checks.fail(ex, hint)
        wrong = [
            name for name, a, b in zip(("t", "noise", "drop"), (t, noise, drop), expected) if not torch.equal(a, b)
        ]
        checks.fail(
            ex,
            f"{' and '.join(wrong)} differ from the trainer's draws (case seed={seed}, step={step}, B={B}, T={T}, "
            f"p_drop={p_drop}). Use one torch.Generator seeded with seed * 1_000_003 + step, and draw with it, in "
            "order: t (torch.randint over 0..T-1), the noise (torch.randn), the coins (torch.rand(B) < p_drop).",
        )
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 6.2 (train_step)
# --------------------------------------------------------------------------

TRAIN_STEP = "6.2 (train_step)"


def _reference_step(model, diffusion, opt, x_0, y, t, noise, drop, which="loss", reduce="mean", zero=True):
    """One step as ``Trainer.train_step`` takes it (no accumulation); ``which``/``reduce``/``zero`` make mistakes."""
    losses = diffusion.training_losses(model, x_0, t, model_kwargs=dict(y=y, force_drop_ids=drop), noise=noise)
    loss = getattr(losses[which], reduce)()
    loss.backward()
    opt.step()
    if zero:
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def _step_case(seed: int, make_opt, steps: int = 2):
    """A tiny model, its optimizer, and ``steps`` batches of inputs (x_0, y, t, noise, drop)."""
    model = _tiny_dit(seed).train()
    g = checks.seeded(seed)
    batches = []
    for _ in range(steps):
        B = 6
        x_0 = torch.rand(B, 3, 8, 8, generator=g) * 2 - 1
        y = torch.randint(0, 4, (B,), generator=g)
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(B, 3, 8, 8, generator=g)
        drop = (torch.rand(B, generator=g) < 0.5).long()
        batches.append((x_0, y, t, noise, drop))
    return model, make_opt(model), batches


def _run_steps(step_fn, seed, make_opt, diffusion, ex=None, **kw):
    model, opt, batches = _step_case(seed, make_opt)
    losses = []
    for b in batches:
        args = (model, diffusion, opt, *(v.clone() for v in b))
        losses.append(checks.call(ex, step_fn, *args) if ex else step_fn(*args, **kw))
    return model, losses


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)


def _params_equal(a, b, atol=1e-6) -> bool:
    return all(torch.allclose(p, q, atol=atol, rtol=1e-5) for p, q in zip(a.parameters(), b.parameters()))


def check_train_step(fn) -> None:
    """Exercise 6.2: ``fn(model, diffusion, opt, x_0, y, t, noise, drop)`` takes one optimizer step and returns
    the batch's mean loss (mse + vb) as a detached 0-dim float32 tensor. Checked over two steps in a row."""
    ex = TRAIN_STEP
    diffusion = create_diffusion("", "cosine", True, 1000)
    for opt_name, make_opt in (("SGD", _sgd), ("AdamW", _adamw)):
        runs = []
        for global_seed in (1234, 98765):  # a step that draws from the global RNG differs between the two
            torch.manual_seed(global_seed)
            runs.append(_run_steps(fn, 60, make_opt, diffusion, ex))
        (model, losses), (other, _) = runs
        for loss in losses:
            if isinstance(loss, float):
                checks.fail(ex, "return the loss as a tensor (loss.detach()), not a Python float: .item() makes the "
                            "CPU wait for the GPU at every step.")  # fmt: skip
            checks.expect_tensor(ex, loss, "the loss")
            if loss.requires_grad:
                checks.fail(ex, "return loss.detach(): a loss that still requires grad keeps the whole graph of the "
                            "step (all activations) alive until it is freed.")  # fmt: skip
            checks.expect_shape(ex, loss, (), {(6,): "return the batch's MEAN loss, one number."})
            checks.expect_dtype(ex, loss, torch.float32)
        if not _params_equal(model, other, atol=0):
            checks.fail(ex, "two runs on the same inputs trained different weights: your step draws from torch's "
                        "global random state (the noise, or the label drops left to the model's own coins). Every "
                        "random number of a step must come from its inputs: t, noise and drop.")  # fmt: skip
        ref_model, ref_losses = _run_steps(_reference_step, 60, make_opt, diffusion)
        if _params_equal(model, _tiny_dit(60), atol=0):
            checks.fail(ex, f"the parameters did not change ({opt_name}): call loss.backward() and then "
                        "opt.step(); clearing the gradients between the two throws the step away.")  # fmt: skip
        loss_hints = [
            ("mse", "mean", "your loss is the MSE alone: the VB term is gone, so the variance channels never learn "
             "(the blog post's bug). DiT trains with the hybrid loss of lesson 05."),
            ("vb", "mean", "your loss is the VB term alone: the mean prediction eps gets no gradient from it."),
            ("loss", "sum", "you summed the per-image losses: average them over the batch, or the step size grows "
             "with the batch size."),
        ]  # fmt: skip
        if not checks.matches(losses[0], ref_losses[0], atol=1e-6):
            for which, reduce, hint in loss_hints:
                _, wrong = _run_steps(_reference_step, 60, make_opt, diffusion, which=which, reduce=reduce)
                if checks.matches(losses[0], wrong[0], atol=1e-6):
                    checks.fail(ex, hint)
        for got, exp in zip(losses, ref_losses):
            checks.expect_close(ex, got, exp, atol=1e-5, rtol=1e-5, what="returned losses",
                                diagnose=lambda got: "return the mean loss of the batch you trained on, computed "
                                "before the optimizer step.")  # fmt: skip
        if not _params_equal(model, ref_model):
            nozero, _ = _run_steps(_reference_step, 60, make_opt, diffusion, zero=False)
            if _params_equal(model, nozero):
                checks.fail(ex, "the second step used the first step's gradients too: clear them once per step; "
                            "backward() ADDS to .grad.")  # fmt: skip
            checks.fail(ex, f"the parameters after two steps ({opt_name}) differ from the reference's: check what you "
                        "give training_losses (labels, drop ids, noise), which loss you backward, and the order of "
                        "backward, optimizer step and clearing the gradients.")  # fmt: skip
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 6.3 (update_ema)
# --------------------------------------------------------------------------

EMA = "6.3 (update_ema)"


def _ema_case(seed: int):
    """An EMA copy and a model that has moved away from it; gradients present; the EMA's frozen pos_embed
    differs from the model's (a stale table), to see whether it is touched."""
    model = _tiny_dit(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        g = checks.seeded(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
                p.grad = torch.randn(p.shape, generator=g)
        ema.pos_embed.mul_(0.5)
    return ema, model


def check_update_ema(fn) -> None:
    """Exercise 6.3: ``fn(ema, model, decay)`` updates ``ema``'s trainable weights in place, towards ``model``."""
    ex = EMA
    for decay in (0.9, 0.99):
        ema, model = _ema_case(63)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ema_before = copy.deepcopy(ema)
        out = checks.call(ex, fn, ema, model, decay)
        if isinstance(out, torch.nn.Module) and out is not ema and _params_equal(ema, ema_before, atol=0):
            checks.fail(ex, "you returned a new model and left `ema` as it was: update ema's parameters IN PLACE "
                        "(the trainer keeps one EMA module for the whole run).")  # fmt: skip
        if any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()):
            checks.fail(ex, "you changed the MODEL's weights: the EMA follows the model, the model is left alone "
                        "(update ema's parameters, not model's).")  # fmt: skip
        if any(p.requires_grad or p.grad_fn is not None for p in ema.parameters()):
            checks.fail(ex, "the EMA's parameters now require grad or carry a graph: do the update under "
                        "torch.no_grad() (it is bookkeeping, not part of any loss).")  # fmt: skip
        if not torch.equal(ema.pos_embed, ema_before.pos_embed):
            checks.fail(ex, "you changed the EMA's pos_embed: it is a frozen table (requires_grad=False), not a "
                        "learned weight. Average only the parameters that train (the reference averaged it too, "
                        "harmless when both hold the same table; minidit leaves frozen tensors alone).")  # fmt: skip
        expected = copy.deepcopy(ema_before)
        update_ema(expected, model, decay)
        trained = [i for i, q in enumerate(model.parameters()) if q.requires_grad]

        def flat(params, trained=trained):
            params = list(params)
            return torch.cat([params[i].flatten() for i in trained])

        got, exp = flat(ema.parameters()), flat(expected.parameters())
        old, new = flat(ema_before.parameters()), flat(model.parameters())
        grad = flat(q.grad if q.grad is not None else torch.zeros_like(q) for q in model.parameters())
        variants = [
            ((1 - decay) * old + decay * new, "decay and 1 - decay are swapped: the EMA keeps `decay` of its own "
             "value and takes only 1 - decay of the model (decay = 0.9999 means 'move 0.01% of the way')."),
            (old, "the EMA did not move: update its parameters in place (p.mul_(...).add_(...), p.lerp_(...) or "
             "p.copy_(...)); rebinding a name or p.data = ... on a copy does not reach the module."),
            (new, "your EMA became a copy of the model: with decay < 1 it moves only 1 - decay of the way."),
            (decay * old + (1 - decay) * grad, "you averaged the GRADIENTS: the EMA averages the weights themselves."),
        ]  # fmt: skip

        def diagnose(got, variants=variants):
            for variant, hint in variants:
                if checks.matches(got, variant, atol=1e-6):
                    return hint
            return None

        checks.expect_close(ex, got, exp, atol=1e-6, rtol=1e-6, diagnose=diagnose, what=f"EMA weights (decay {decay})")
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 6.4 (process_images)
# --------------------------------------------------------------------------

IMAGES = "6.4 (process_images)"


def _trainer_images(step, rank, world_size, G, micro, image_size=8):
    """The images ``ToyBatches`` renders for process ``rank`` of ``world_size`` at ``step``: [accum, micro, 3, S, S]."""
    accum = G // (micro * world_size)
    cfg = SimpleNamespace(global_batch_size=G, seed=0, image_size=image_size)
    batches = iter(ToyBatches(cfg, Dist(rank, rank, world_size), micro, accum, step))
    return torch.stack([next(batches)[0] for _ in range(accum)])


def _expected_indices(step, rank, world_size, G, micro):
    accum = G // (micro * world_size)
    proc = Dist(rank, rank, world_size)
    return torch.stack([step * G + batch_positions(a, micro, proc) for a in range(accum)])


def _index_variants(step, rank, W, G, micro):
    accum = G // (micro * W)
    a = torch.arange(accum).view(-1, 1)
    i = torch.arange(micro).view(1, -1)
    per_process = G // W
    right = (a * micro + i) * W + rank
    swap = (a * micro + i) * rank + W
    return [
        (step * G + rank * per_process + a * micro + i, "your positions are contiguous: process r takes a block of "
         "G/W images. The trainer interleaves them (position p goes to process p mod W), as DistributedSampler does, "
         "so that W processes with micro-batch b see the same images as one process with W·b."),
        (step * G + a * micro * W + rank * micro + i, "within each micro-step your processes take contiguous blocks "
         "of micro images: the trainer interleaves every position (position p goes to process p mod W)."),
        (step * G + swap, "rank and world size are swapped: a process's positions stride by the world size W, and "
         "its rank r is the offset."),
        ((step + 1) * G + right, "off by one step: step s starts at image s·G (step 0 at image 0)."),
        ((step - 1) * G + right, "off by one step: step s starts at image s·G (step 0 at image 0)."),
        (right, "every step would render the same images: step s's images start at s·G."),
        (step * G + (i * W + rank).expand(accum, -1), "every micro-step would see the same images: micro-step a "
         "continues where micro-step a - 1 stopped (it covers the next micro·W positions)."),
        (step * micro * W + right, "step s starts at image s·G, with G the GLOBAL batch (W · micro · accumulation)."),
    ]  # fmt: skip


def check_process_images(fn) -> None:
    """Exercise 6.4: ``fn(step, rank, world_size, global_batch, micro)`` -> int64 [accum, micro], the toy-image
    indices process ``rank`` renders at each micro-step of optimizer ``step``."""
    ex = IMAGES
    cases = [(0, 0, 1, 8, 8), (3, 1, 2, 16, 8), (5, 2, 4, 32, 4), (2, 3, 4, 32, 2), (7, 0, 8, 64, 8)]
    for step, rank, W, G, micro in cases:
        accum = G // (micro * W)
        got = checks.expect_tensor(ex, checks.call(ex, fn, step, rank, W, G, micro))
        checks.expect_shape(ex, got, (accum, micro), hints={
            (accum * micro,): f"return one row per micro-step: shape (accumulation, micro) = ({accum}, {micro}).",
            (micro, accum): "rows are micro-steps, columns the images of each: (accumulation, micro).",
        })  # fmt: skip
        checks.expect_dtype(ex, got, torch.int64, "image indices are int64 (toy.make_batch takes an integer tensor).")
        expected = _expected_indices(step, rank, W, G, micro)
        trainer = _trainer_images(step, rank, W, G, micro)
        mine = torch.stack([toy.make_batch(row, seed=0, image_size=8)[0] for row in got])
        if torch.equal(got, expected) and torch.equal(mine, trainer):
            continue
        case = f"(case step={step}, rank={rank}, W={W}, G={G}, micro={micro}: accumulation {accum})"
        for variant, hint in _index_variants(step, rank, W, G, micro):
            if torch.equal(got, variant):
                checks.fail(ex, f"{hint} {case}")
        checks.fail(ex, f"these are not the images the trainer renders for this process {case}: step s renders "
                    "images s·G ... s·G + G - 1, and hands the positions of that global batch to the processes "
                    "interleaved, micro-step after micro-step.")  # fmt: skip
    checks.passed(ex)
