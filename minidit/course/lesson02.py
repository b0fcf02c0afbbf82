"""Checks for lesson 02: conditioning on timesteps and labels, and adaLN-Zero.

Each ``check_<name>(fn)`` calls the learner's function on seeded inputs, compares it with the
reference in ``minidit`` (``minidit.embed``, ``minidit.model``), prints one line on success, or
raises ``AssertionError`` naming the likely mistake (found by comparing with known wrong variants).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from minidit.embed import timestep_embedding as _ref_timestep_embedding
from minidit.model import modulate as _ref_modulate

from . import checks

# --------------------------------------------------------------------------
# Exercise 2.1 (timestep_embedding)
# --------------------------------------------------------------------------

TIMESTEP = "2.1 (timestep_embedding)"


def _sincos(
    t: torch.Tensor,
    dim: int,
    max_period: float,
    *,
    denom=None,
    cos_first=True,
    interleave=False,
    t_scale=1.0,
    two_pi=False,
) -> torch.Tensor:
    """The embedding with one knob turned: the wrong variants a learner plausibly writes."""
    half = dim // 2
    denom = half if denom is None else denom
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / denom)
    args = (t.double() * t_scale)[:, None] * freqs[None] * (2 * math.pi if two_pi else 1.0)
    a, b = (torch.cos(args), torch.sin(args)) if cos_first else (torch.sin(args), torch.cos(args))
    if interleave:
        return torch.stack([a, b], dim=-1).reshape(len(t), 2 * half)
    return torch.cat([a, b], dim=-1)


def _timestep_variants(t: torch.Tensor, dim: int, max_period: float) -> list[tuple[torch.Tensor, str]]:
    half = dim // 2
    return [
        (
            _sincos(t, dim, max_period, cos_first=False),
            "you put sin first: DiT (like ADM) concatenates all the cosines, then all the sines: "
            "cat([cos(t·f), sin(t·f)]).",
        ),
        (
            _sincos(t, dim, max_period, interleave=True),
            "you interleaved cos and sin (cos, sin, cos, sin, ...): DiT concatenates them, "
            f"[cos(t·f_0..f_{half - 1}), sin(t·f_0..f_{half - 1})].",
        ),
        (
            _sincos(t, dim, max_period, interleave=True, cos_first=False),
            "you interleaved sin and cos as the original Transformer's positional encoding does: DiT concatenates "
            "them, cosines first.",
        ),
        (
            _sincos(t, dim, max_period, denom=half - 1),
            f"your exponent divides by half - 1 = {half - 1} (diffusers' choice). DiT divides by half = {half}: "
            f"f_i = exp(-ln(max_period) · i / {half}).",
        ),
        (
            _sincos(t, dim, max_period, denom=half - 1, cos_first=False),
            f"you wrote DDPM's variant (sin first, exponent divided by half - 1 = {half - 1}). DiT puts cos first and "
            f"divides by half = {half}.",
        ),
        (
            _sincos(t, dim, max_period, denom=dim),
            f"your exponent divides by dim = {dim}: divide by half = dim // 2 = {half}, so the frequencies run from "
            "1 down to about 1/max_period.",
        ),
        (
            _sincos(t, dim, max_period, t_scale=1 / 1000),
            "you rescaled t to [0, 1]: DiT embeds the raw step index 0..999 (t / 1000 squeezes every frequency's "
            "argument, so all timesteps get nearly the same embedding).",
        ),
        (
            _sincos(t, dim, max_period, t_scale=1 / 999),
            "you rescaled t to [0, 1]: DiT embeds the raw step index 0..999.",
        ),
        (
            _sincos(t, dim, max_period, two_pi=True),
            "you multiplied the arguments by 2π: the DiT's embedding is cos(t · f_i) and sin(t · f_i), with no 2π.",
        ),
        (
            _sincos(t, dim, 10000.0),
            f"you ignored the max_period argument ({max_period:g} in this case) and used 10000.",
        ),
        (
            _sincos(t, dim, 1000.0),
            f"your frequencies use a period of 1000 (the number of diffusion steps?) instead of max_period = "
            f"{max_period:g}: f_i = exp(-ln(max_period) · i / half), with the max_period argument.",
        ),
    ]


def check_timestep_embedding(fn) -> None:
    """Exercise 2.1: ``fn(t, dim=256, max_period=10000.0)``: t [B] -> [B, dim], cos first."""
    ex = TIMESTEP
    g = checks.seeded(21)
    cases = [
        (torch.tensor([0, 1, 10, 250, 999]), 256, 10000.0),
        (torch.randint(0, 1000, (3,), generator=g), 64, 10000.0),
        (torch.tensor([999]), 256, 10000.0),
        (torch.tensor([0.5, 17.25, 420.0, 998.75]), 10, 10000.0),  # fractional steps work too
        (torch.randint(0, 1000, (7,), generator=g), 32, 1000.0),
    ]
    for t, dim, max_period in cases:
        t_in = t.clone()
        if max_period == 10000.0:  # the default: the learner's default must be 10000 too
            got = checks.call(ex, fn, t_in, dim)
        else:
            got = checks.call(ex, fn, t_in, dim, max_period=max_period)
        got = checks.expect_tensor(ex, got)
        if not torch.equal(t_in, t):
            checks.fail(ex, "your function changed its input t in place: compute on a copy (t.float() makes one).")
        expected = _ref_timestep_embedding(t, dim, max_period)
        B, half = len(t), dim // 2
        checks.expect_shape(
            ex,
            got,
            (B, dim),
            hints={
                (B, half): "that is half the width: concatenate the cosines and the sines (each dim // 2 wide).",
                (dim, B): "you built it transposed: one row per timestep, [B, dim].",
                (B, 1, dim): "one row per timestep, [B, dim]: drop the extra axis.",
                (B, 2, half): "stack gave [B, 2, dim//2]: concatenate along the last axis instead, [B, dim].",
            },
        )
        if got.dtype != torch.float32:
            checks.fail(ex, f"got dtype {got.dtype}, expected torch.float32 (the embedding feeds a float32 Linear).")
        if not torch.isfinite(got).all():
            checks.fail(ex, "your embedding contains NaN or inf.")

        def diagnose(got, t=t, dim=dim, max_period=max_period):
            for variant, hint in _timestep_variants(t, dim, max_period):
                if checks.matches(got, variant, atol=2e-3):
                    return hint
            return f"(case: t = {t.tolist()}, dim = {dim}, max_period = {max_period:g})"

        checks.expect_close(ex, got, expected, atol=2e-3, rtol=1e-4, diagnose=diagnose)
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 2.2 (label_dropout)
# --------------------------------------------------------------------------

LABELS = "2.2 (label_dropout)"


def _call_labels(fn, labels, num_classes, dropout_prob, train, force_drop_ids=None):
    ex = LABELS
    before = labels.clone()
    force_before = None if force_drop_ids is None else force_drop_ids.clone()
    got = checks.call(ex, fn, labels, num_classes, dropout_prob, train, force_drop_ids)
    got = checks.expect_tensor(ex, got)
    if not torch.equal(labels, before) or (
        force_drop_ids is not None and not torch.equal(force_drop_ids, force_before)
    ):
        checks.fail(ex, "your function changed its input in place: return a new tensor (torch.where makes one).")
    checks.expect_shape(ex, got, tuple(labels.shape))
    if got.dtype != labels.dtype:
        checks.fail(ex, f"got dtype {got.dtype}, expected {labels.dtype}: labels are integer indices into the table.")
    return got


def _null_hint(got: torch.Tensor, labels: torch.Tensor, num_classes: int) -> str | None:
    """Which wrong null index was used where labels were replaced."""
    changed = got != labels
    if not changed.any():
        return None
    values = set(got[changed].tolist())
    if values == {num_classes}:
        return None
    if values == {num_classes - 1}:
        return (
            f"dropped labels became {num_classes - 1} = K - 1, the last *real* class. The null label is "
            f"K = num_classes = {num_classes}: the extra, last row of the table of K + 1 rows."
        )
    if values == {0}:
        return f"dropped labels became 0, which is a real class. The null label is K = num_classes = {num_classes}."
    if values == {-1}:
        return f"dropped labels became -1: the null label is the index K = num_classes = {num_classes}, not -1."
    return f"labels were replaced by {sorted(values)[:5]}: a dropped label must become K = num_classes = {num_classes}."


def _flip_hint(got: torch.Tensor, many: torch.Tensor, K: int, p: float, seed: int) -> str:
    """Name the way of flipping coins behind ``got`` (right rate or not), drawn after ``manual_seed(seed)``."""
    B = len(many)
    frac = (got == K).double().mean().item()
    sd = math.sqrt(p * (1 - p) / B)
    if abs(frac - p) > 6 * sd:
        if abs(frac - (1 - p)) <= 6 * sd:
            return (
                f"your mask is inverted: you dropped {frac:.1%} of the labels with dropout_prob = {p}. A label is "
                "dropped when its uniform number is BELOW dropout_prob."
            )
        if frac == 0.0:
            return (
                f"nothing was dropped with train=True and dropout_prob = {p}: flip one coin per label "
                "(one uniform number each) and drop where it is below dropout_prob."
            )
        if frac == 1.0:
            return f"every label was dropped with dropout_prob = {p}: drop only where the uniform number is below it."
        return (
            f"you dropped {frac:.1%} of {B} labels with dropout_prob = {p}: each label must be dropped "
            "independently with probability dropout_prob."
        )
    variants = {
        "above": lambda: torch.rand(B) > 1 - p,
        "float64": lambda: torch.rand(B, dtype=torch.float64) < p,
    }
    dropped = got == K

    def drawn(draw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return draw()

    name = next((n for n, draw in variants.items() if torch.equal(dropped, drawn(draw))), None)
    how = {
        "above": "you drop where the uniform number is ABOVE 1 - dropout_prob: the same rate, other labels. ",
        "float64": "you drew float64 uniform numbers: they consume the random stream differently. ",
    }.get(name, "")
    return (
        f"you dropped {frac:.1%} of the labels, the right rate, but not the reference's coin flips. {how}With the same "
        "seed the reference draws ONE batch of uniform numbers, torch.rand(B) on the labels' device (float32, the "
        "global generator), and drops where it is below dropout_prob. Any other draw drops other labels, so a run "
        "is no longer reproducible against the reference (the cell after this check compares with token_drop)."
    )


def _call_counting_draws(fn, *args) -> tuple[torch.Tensor, bool]:
    """The learner's labels, and whether the call moved the global random stream."""
    state = torch.get_rng_state()
    got = _call_labels(fn, *args)
    return got, not torch.equal(torch.get_rng_state(), state)


def _expect_no_draw(ex: str, drew: bool, case: str) -> None:
    """Where no coin is flipped (evaluation, force_drop_ids, p = 0) the reference draws nothing: the global
    random stream, and so every later random number of a training run, must stay where it was."""
    if drew:
        checks.fail(
            ex,
            f"{case}, no coin is flipped, but your function drew random numbers anyway. The reference draws only when "
            "it flips coins (train=True, no force_drop_ids, dropout_prob > 0); an extra draw shifts every later "
            "random number of a training run (noise, timesteps), so it no longer matches the reference's.",
        )


def check_label_dropout(fn) -> None:
    """Exercise 2.2: ``fn(labels, num_classes, dropout_prob, train, force_drop_ids=None)`` -> labels [B]."""
    ex = LABELS
    K = 10
    # No label is 0 or K - 1, so a wrong null index (0, K - 1) is visible.
    labels = torch.tensor([3, 7, 1, 5, 8, 2, 4, 6, 3, 5, 1, 7])
    force = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0])
    forced = torch.where(force == 1, torch.full_like(labels, K), labels)

    with torch.random.fork_rng():
        torch.manual_seed(22)
        # 1. Evaluation mode without force_drop_ids: nothing changes.
        got, drew = _call_counting_draws(fn, labels, K, 0.5, False)
        if not torch.equal(got, labels):
            checks.fail(
                ex,
                "with train=False (and no force_drop_ids) labels must pass through unchanged: label "
                "dropout happens in training only. (The CFG sampler asks for the null label explicitly.)",
            )
        _expect_no_draw(ex, drew, "with train=False")

        # 2. force_drop_ids, in evaluation mode: exactly the marked labels become K.
        got, drew = _call_counting_draws(fn, labels, K, 0.5, False, force)
        if not torch.equal(got, forced):
            hint = _null_hint(got, labels, K)
            if hint is None and torch.equal(got, labels):
                hint = (
                    "force_drop_ids was ignored with train=False: when it is given it decides which labels "
                    "are dropped, in training and in evaluation (samplers use it to get the null label)."
                )
            elif hint is None and torch.equal(got, torch.where(force == 0, torch.full_like(labels, K), labels)):
                hint = "your mask is inverted: force_drop_ids == 1 means *drop* that label."
            elif hint is None and bool(((got == K) | (force == 0)).all()):
                hint = (
                    "you dropped more labels than force_drop_ids asks for: when it is given it decides alone "
                    "(drop exactly where force_drop_ids == 1), with no random coin flips on top."
                )
            checks.fail(
                ex,
                f"with force_drop_ids = {force.tolist()} expected {forced.tolist()}, got "
                f"{got.tolist()}. {hint or ''}".rstrip(),
            )
        _expect_no_draw(ex, drew, "with force_drop_ids (and train=False)")

        # 3. force_drop_ids in training mode replaces the coin flips.
        got, drew = _call_counting_draws(fn, labels, K, 0.5, True, force)
        if not torch.equal(got, forced):
            hint = _null_hint(got, labels, K)
            if hint is None and torch.equal(got, torch.where(force == 0, torch.full_like(labels, K), labels)):
                hint = "your mask is inverted: force_drop_ids == 1 means *drop* that label."
            elif hint is None:
                hint = (
                    "when force_drop_ids is given it *replaces* the random coin flips (drop exactly where "
                    "force_drop_ids == 1); don't combine both."
                )
            checks.fail(
                ex,
                f"train=True with force_drop_ids = {force.tolist()}: expected {forced.tolist()}, got "
                f"{got.tolist()}. {hint}",
            )
        _expect_no_draw(ex, drew, "with force_drop_ids (and train=True)")

        # 4. Training mode: each label becomes the null label with probability p, with the reference's coin
        #    flips: after the same seed, the same labels are dropped (the lesson compares with token_drop).
        for n, (p, K_big, B) in enumerate([(0.1, 1000, 20000), (0.3, 7, 5000), (0.5, 10, 12)]):
            many = torch.randint(0, K_big, (B,))
            torch.manual_seed(220 + n)
            got = _call_labels(fn, many, K_big, p, True)
            hint = _null_hint(got, many, K_big)
            if hint:
                checks.fail(ex, hint)
            torch.manual_seed(220 + n)
            expected = torch.where(torch.rand(B) < p, torch.full_like(many, K_big), many)
            if not torch.equal(got, expected):
                checks.fail(ex, _flip_hint(got, many, K_big, p, 220 + n))

        # 5. The extremes and a batch of one.
        got, drew = _call_counting_draws(fn, labels, K, 0.0, True)
        if not torch.equal(got, labels):
            checks.fail(ex, "with dropout_prob = 0 nothing may be dropped (drop where u < p, not u <= p).")
        _expect_no_draw(ex, drew, "with dropout_prob = 0")
        got = _call_labels(fn, labels, K, 1.0, True)
        if not torch.equal(got, torch.full_like(labels, K)):
            checks.fail(ex, "with dropout_prob = 1 every label must become the null label K.")
        got = _call_labels(fn, labels[:1], K, 0.5, False, torch.ones(1, dtype=torch.long))
        if not torch.equal(got, torch.tensor([K])):
            checks.fail(ex, f"a batch of one with force_drop_ids = [1] should give [{K}], got {got.tolist()}.")
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 2.3 (modulate)
# --------------------------------------------------------------------------

MODULATE = "2.3 (modulate)"


def _modulate_variants(x, shift, scale) -> list[tuple[torch.Tensor, str]]:
    s, c = shift.unsqueeze(1), scale.unsqueeze(1)
    out = [
        (
            x * c + s,
            "you left out the `1 +`: it is x · (1 + scale) + shift, so that scale = 0 leaves x unchanged "
            "(adaLN-Zero relies on it).",
        ),
        (x * (1 + s) + c, "you swapped shift and scale: modulate(x, shift, scale) = x · (1 + scale) + shift."),
        (x * s + c, "you swapped shift and scale and left out the `1 +`: x · (1 + scale) + shift."),
        ((x + s) * (1 + c), "you shifted before scaling: (x + shift) · (1 + scale). It is x · (1 + scale) + shift."),
        (x * (1 - c) + s, "sign error: x · (1 - scale). It is x · (1 + scale) + shift."),
        (x * (1 + c) - s, "sign error: - shift. It is x · (1 + scale) + shift."),
        (x * (1 + c), "you left out the shift: x · (1 + scale) + shift."),
        (x + s, "you left out the scale: x · (1 + scale) + shift."),
    ]
    if x.shape[0] == x.shape[1]:  # B == T: broadcasting [B, D] against [B, T, D] "works" along the token axis
        out.append(
            (
                x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0),
                "shift and scale were broadcast over the *batch* axis (row b used for token b): they are "
                "[B, D], one vector per sample, applied to all T tokens: use shift.unsqueeze(1), "
                "scale.unsqueeze(1) ([B, 1, D]).",
            )
        )
    return out


def check_modulate(fn) -> None:
    """Exercise 2.3: ``fn(x, shift, scale)``: x [B, T, D], shift and scale [B, D] -> [B, T, D]."""
    ex = MODULATE
    g = checks.seeded(23)
    for B, T, D in [(2, 5, 7), (3, 3, 4), (1, 4, 6), (4, 1, 8)]:
        x = torch.randn(B, T, D, generator=g)
        shift = torch.randn(B, D, generator=g)
        scale = 0.5 * torch.randn(B, D, generator=g)
        args = (x.clone(), shift.clone(), scale.clone())
        try:
            got = fn(*args)
        except NotImplementedError:
            checks.fail(ex, "not implemented yet: replace the `raise NotImplementedError(...)` line with your code.")
        except RuntimeError as e:
            if "size of tensor" in str(e) or "broadcast" in str(e):
                checks.fail(
                    ex,
                    f"with x {tuple(x.shape)} and shift, scale {tuple(shift.shape)} your function raised "
                    f"'{e}'. shift and scale are [B, D], one vector per sample: unsqueeze(1) them to "
                    "[B, 1, D] so that they broadcast over the T tokens.",
                )
            checks.fail(ex, f"your function raised RuntimeError: {e}")
        except Exception as e:  # noqa: BLE001 - shown to the learner
            checks.fail(ex, f"your function raised {type(e).__name__}: {e}")
        got = checks.expect_tensor(ex, got)
        checks.expect_dtype(ex, got, x.dtype, "modulate keeps the dtype of x: the blocks run it in the model's dtype.")
        if not all(torch.equal(a, b) for a, b in zip(args, (x, shift, scale))):
            checks.fail(ex, "your function changed its inputs in place: compute a new tensor (no mul_ / add_).")
        expected = _ref_modulate(x, shift, scale)

        def diagnose(got, x=x, shift=shift, scale=scale):
            for variant, hint in _modulate_variants(x, shift, scale):
                if checks.matches(got, variant):
                    return hint
            return f"(case: B={x.shape[0]}, T={x.shape[1]}, D={x.shape[2]})"

        checks.expect_shape(
            ex,
            got,
            (B, T, D),
            hints={
                (B, B, D): "shift and scale must broadcast over the T tokens: unsqueeze(1) them to [B, 1, D].",
                (B, D): "the result keeps every token: [B, T, D].",
            },
        )
        checks.expect_close(ex, got, expected, diagnose=diagnose)
    checks.passed(ex)


# --------------------------------------------------------------------------
# Exercise 2.4 (adaln_zero)
# --------------------------------------------------------------------------

ADALN = "2.4 (adaln_zero)"
_CHUNK_HINT = (
    "You split the regressor's output with chunk(3) and no dim: chunk splits dim 0, the BATCH axis, by default. "
    "The three vectors lie side by side along the feature axis of [B, 3D]: split that axis."
)
_ORDER = ("shift", "scale", "gate")


def _sublayer(D: int, seed: int) -> nn.Module:
    """The f of the branch: a small seeded MLP (a stand-in for attention or the DiT's MLP)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        f = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(approximate="tanh"), nn.Linear(2 * D, D))
    return f


def _branch(x, c, linear, f, *, order=_ORDER, silu=True, eps=1e-6, norm=True, gate_mode="gate"):
    """The adaLN-Zero branch x + gate · f(modulate(LN(x), shift, scale)), with one knob turned."""
    mod = linear(F.silu(c) if silu else c)
    parts = dict(zip(order, mod.chunk(3, dim=1)))
    h = F.layer_norm(x, (x.shape[-1],), eps=eps) if norm else x
    h = _ref_modulate(h, parts["shift"], parts["scale"])
    gate = parts["gate"].unsqueeze(1)
    if gate_mode == "gate":
        return x + gate * f(h)
    if gate_mode == "none":
        return x + f(h)
    if gate_mode == "one_plus":
        return x + (1 + gate) * f(h)
    if gate_mode == "no_residual":
        return gate * f(h)
    if gate_mode == "inside":
        return x + f(gate * h)
    raise ValueError(gate_mode)


def _adaln_variants(x, c, linear, f) -> list[tuple[torch.Tensor, str]]:
    out = []
    for order in itertools.permutations(_ORDER):
        if order != _ORDER:
            out.append(
                (
                    _branch(x, c, linear, f, order=order),
                    f"you split the Linear's output as ({', '.join(order)}): the reference's order is "
                    "(shift, scale, gate), as in shift_msa, scale_msa, gate_msa = ...chunk(3, dim=1).",
                )
            )
    out += [
        (
            _branch(x, c, linear, f, silu=False),
            "the condition goes through SiLU before the Linear: adaLN_modulation = Sequential(SiLU(), Linear(D, 3D)).",
        ),
        (
            _branch(x, c, linear, f, eps=1e-5),
            "your LayerNorm uses eps = 1e-5 (PyTorch's default): DiT's LayerNorms use eps = 1e-6.",
        ),
        (
            _branch(x, c, linear, f, norm=False),
            "you modulated x itself: normalise first, modulate(LN(x), shift, scale), with LN = LayerNorm(D, eps=1e-6, "
            "elementwise_affine=False).",
        ),
        (
            _branch(x, c, linear, f, gate_mode="none"),
            "the branch is not gated: x + gate · f(modulate(LN(x), shift, scale)).",
        ),
        (
            _branch(x, c, linear, f, gate_mode="one_plus"),
            "you used (1 + gate): the gate multiplies the branch directly, x + gate · f(...), so that a zero gate "
            "closes the branch.",
        ),
        (
            _branch(x, c, linear, f, gate_mode="no_residual"),
            "you returned only the branch: add the residual, x + gate · f(...).",
        ),
        (
            _branch(x, c, linear, f, gate_mode="inside"),
            "the gate multiplies f's *output*, not its input: x + gate · f(modulate(LN(x), shift, scale)).",
        ),
    ]
    return out


def _identity_hint(got, x, f) -> str:
    D = x.shape[-1]
    if checks.matches(got, torch.zeros_like(x)):
        return "your output is 0: add the residual, return x + gate · f(...)."
    for h in (F.layer_norm(x, (D,), eps=1e-6), F.layer_norm(x, (D,), eps=1e-5), x):
        if checks.matches(got, x + f(h), atol=1e-4):
            return (
                "your output is x + f(...): the branch is not gated by the (zero) gate. It is x + gate · f(...), "
                "not x + (1 + gate) · f(...)."
            )
    if checks.matches(got, x + f(torch.zeros_like(x)), atol=1e-4):
        return "your output is x + f(0): the gate multiplies f's output, not its input."
    return (
        "with a zero-initialised adaLN_modulation the shift, scale and gate are all 0, so the block must return "
        "x exactly (x + 0 · f(...))."
    )


def check_adaln_zero(cls) -> None:
    """Exercise 2.4: ``cls(hidden_size, fn)`` is an adaLN-Zero residual branch; ``module(x, c)``:
    x [B, T, D], c [B, D] -> [B, T, D]."""
    ex = ADALN
    g = checks.seeded(24)
    for D, seed in [(8, 0), (12, 1)]:
        f = _sublayer(D, seed)
        m = checks.call(ex, cls, D, f)
        if not isinstance(m, nn.Module):
            checks.fail(
                ex,
                f"{getattr(cls, '__name__', 'your class')}(hidden_size, fn) should build an nn.Module, "
                f"got {type(m).__name__}.",
            )
        mod = getattr(m, "adaLN_modulation", None)
        if not isinstance(mod, nn.Sequential) or len(mod) == 0 or not isinstance(mod[-1], nn.Linear):
            checks.fail(
                ex,
                "define self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D)): the "
                "reference's name, so that checkpoints load into it.",
            )
        linear = mod[-1]
        if (linear.in_features, linear.out_features) != (D, 3 * D) or linear.bias is None:
            hint = {
                2 * D: " You regress only shift and scale (that is adaLN): adaLN-Zero adds a gate, 3 · D outputs.",
                6 * D: " This is one residual branch (shift, scale, gate): the full DiTBlock has two, 6 · D.",
            }
            checks.fail(
                ex,
                f"adaLN_modulation[-1] is Linear({linear.in_features}, {linear.out_features}, "
                f"bias={linear.bias is not None}), expected Linear({D}, {3 * D}, bias=True)."
                + hint.get(linear.out_features, ""),
            )

        # No parameters besides the regressor and the wrapped sublayer (DiT's LayerNorms have none).
        f_params = {id(p) for p in f.parameters()}
        extra = [n for n, p in m.named_parameters() if id(p) not in f_params and not n.startswith("adaLN_modulation.")]
        if extra:
            checks.fail(
                ex,
                f"unexpected parameters {extra}: DiT's LayerNorms hold no parameters "
                "(nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)); a checkpoint would not load "
                "strictly.",
            )

        # The "-Zero": the regressor starts at zero, weight *and* bias.
        if linear.weight.detach().abs().max() != 0 or linear.bias.detach().abs().max() != 0:
            which = [n for n, p in (("weight", linear.weight), ("bias", linear.bias)) if p.detach().abs().max() != 0]
            verb = "are" if len(which) == 2 else "is"
            checks.fail(
                ex,
                f"adaLN_modulation[-1].{' and .'.join(which)} {verb} not zero at initialisation: "
                "zero-initialise the Linear's weight and bias (nn.init.zeros_), so that every gate "
                "starts at 0 and the branch is the identity. That is the '-Zero' of adaLN-Zero.",
            )

        # Identity at initialisation.
        x, c = torch.randn(2, 5, D, generator=g), torch.randn(2, D, generator=g)
        with torch.no_grad():
            got = checks.expect_tensor(
                ex, checks.call_watching_chunks(ex, m, x.clone(), c.clone(), chunks=3, hint=_CHUNK_HINT)
            )
            checks.expect_shape(ex, got, tuple(x.shape))
            if not torch.allclose(got, x, atol=1e-6, rtol=0):
                checks.fail(ex, "at initialisation the branch is not the identity: " + _identity_hint(got, x, f))

        # With a trained (random) regressor, the values match the reference formula.
        with torch.no_grad():
            linear.weight.copy_(0.5 * torch.randn(3 * D, D, generator=g))
            linear.bias.copy_(0.5 * torch.randn(3 * D, generator=g))
        for B, T, amp in [(2, 5, 1.0), (3, 1, 1.0), (2, 4, 0.003)]:  # tiny inputs make LayerNorm's eps visible
            x, c = amp * torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g)
            with torch.no_grad():
                got = checks.call_watching_chunks(ex, m, x.clone(), c.clone(), chunks=3, hint=_CHUNK_HINT)
                got = checks.expect_tensor(ex, got)
                expected = _branch(x, c, linear, f)

            def diagnose(got, x=x, c=c, linear=linear, f=f):  # only runs on a mismatch
                B, T, D = x.shape
                with torch.no_grad():
                    variants = _adaln_variants(x, c, linear, f)
                for variant, hint in variants:
                    if checks.matches(got, variant, atol=1e-5 * max(1.0, variant.abs().max().item())):
                        return hint
                return f"(case: x [{B}, {T}, {D}], c [{B}, {D}], with random weights in adaLN_modulation)"

            checks.expect_close(ex, got, expected, atol=1e-5, rtol=1e-4, diagnose=diagnose)
    checks.passed(ex)
