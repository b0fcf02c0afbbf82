"""Checks of lesson 01 (patchify): images and latents to tokens and back, and the position table.

Each check runs the learner's function on seeded inputs of several shapes (square and not, odd grids,
channel counts that differ from the patch size), compares with ``minidit.embed`` and, on a mismatch,
recomputes the known wrong variants of the exercise (every combination of the usual slips: channels
first, column-major tokens, transposed patches, (p h) instead of (h p), sin/cos swapped, ...) to name
the mistake in the hint.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ..embed import get_2d_sincos_pos_embed
from ..embed import patchify as ref_patchify
from ..embed import unpatchify as ref_unpatchify
from . import checks
from .checks import ExerciseFailed

__all__ = [
    "check_patchify",
    "check_patchify_einops",
    "check_unpatchify",
    "check_patch_embed_as_linear",
    "check_pos_embed",
]

# --------------------------------------------------------------------------
# Shared: name the mistakes of a wrong variant
# --------------------------------------------------------------------------

_AXIS = {"p": "patch row", "q": "patch column", "c": "channel"}


def _patch_order_hint(order: tuple[str, ...], reading: bool = False) -> str:
    """A hint for a token laid out in ``order`` (a permutation of ("p", "q", "c")) instead of (p, q, c)."""
    named = ", ".join(_AXIS[a] for a in order)
    verb = "read each token as" if reading else "lay each token out as"
    if order == ("c", "p", "q"):
        return (
            f"you {verb} (channel, patch row, patch column): channels first, the Conv2d weight's order. "
            "The reference's token is (patch row, patch column, channel): channels LAST, so neighbouring "
            "values are the C channels of one pixel."
        )
    if order == ("q", "p", "c"):
        return (
            "each patch is transposed: inside a token the patch ROW must vary slowest, then the patch column, "
            "then the channel (p, q, c)."
        )
    return f"you {verb} ({named}); the reference's order is (patch row, patch column, channel): channels last."


def _first_match(got: torch.Tensor, variants: list[tuple[tuple, torch.Tensor]]) -> tuple | None:
    """The mistakes of the first variant ``got`` equals (variants are sorted by number of mistakes)."""
    for mistakes, candidate in variants:
        if checks.matches(got, candidate):
            return mistakes
    return None


def _with_input(err: ExerciseFailed, what: str, earlier_passed: bool, non_square: bool) -> ExerciseFailed:
    """The failure, with the input it happened on (not for a stub: "not implemented" says it all)."""
    if "not implemented yet" in str(err):
        return err
    message = f"{err} [input: {what}]"
    if earlier_passed and non_square:
        message += " Square inputs passed: somewhere you use H (or h) where W (or w) belongs."
    return ExerciseFailed(message)


# --------------------------------------------------------------------------
# Exercises 1.1 (patchify) and 1.2 (patchify_einops)
# --------------------------------------------------------------------------

_PATCHIFY_CASES = [  # (B, C, H, W, p): p differs from the grid size, channels from p*p
    (2, 3, 8, 8, 2),  # 4 x 4 grid of 2 x 2 patches
    (2, 4, 12, 12, 4),  # 3 x 3 grid (odd)
    (1, 4, 12, 8, 4),  # 3 x 2 grid: not square
    (3, 2, 6, 10, 2),  # 3 x 5 grid: not square
]

_TOKEN_ORDERS = {"(h w)": None, "(w h)": "column_major"}
_SPLITS = {("(h p)", "(w q)"): None, ("(p h)", "(q w)"): "interleaved"}


def _patchify_variants(x: torch.Tensor, p: int) -> list[tuple[tuple, torch.Tensor]]:
    """Every combination of token order x patch split x order inside the token, fewest mistakes first."""
    h, w = x.shape[2] // p, x.shape[3] // p
    out = []
    for tokens, split, order in itertools.product(_TOKEN_ORDERS, _SPLITS, itertools.permutations("pqc")):
        mistakes = tuple(
            m for m in (_TOKEN_ORDERS[tokens], _SPLITS[split], None if order == tuple("pqc") else order) if m
        )
        pattern = f"b c {split[0]} {split[1]} -> b {tokens} ({' '.join(order)})"
        out.append((mistakes, rearrange(x, pattern, h=h, w=w, p=p, q=p)))
    return sorted(out, key=lambda v: len(v[0]))


def _patchify_hint(mistakes: tuple) -> str:
    if "column_major" in mistakes and ("q", "p", "c") in mistakes and len(mistakes) == 2:
        return (
            "You patchified the TRANSPOSED image: rows and columns are swapped everywhere (token order and "
            "inside each patch). Keep H before W when you split: [B, C, h, p, w, p], rows before columns."
        )
    hints = []
    for m in mistakes:
        if m == "column_major":
            hints.append(
                "Your tokens run column by column; the reference numbers patches row by row "
                "(row-major): token t = i*w + j for grid row i, grid column j."
            )
        elif m == "interleaved":
            hints.append(
                "Each of your 'patches' gathers pixels H/p apart instead of a contiguous p x p block: image row "
                "= i*p + a, so the grid index i is the SLOW factor when you split H: (h p) in einops terms, "
                "[h, p] as shapes, not (p h)."
            )
        else:
            text = _patch_order_hint(m)
            hints.append(text[0].upper() + text[1:])
    return " ".join(hints)


def _patchify_shape_hints(B: int, C: int, H: int, W: int, p: int) -> dict:
    h, w = H // p, W // p
    T, F = h * w, p * p * C
    hints = {
        (B, p * p, T * C): "Did you swap the patch size and the grid size? There are (H/p)*(W/p) tokens of p*p*C "
        "values each: split H into (H/p, p), not (p, H/p).",
        (B, F, T): "Tokens and features are swapped: the result is [B, T, p*p*C], one row per patch.",
        (B, h, w, F): "Flatten the h x w grid of patches into one token axis T = h*w (row by row).",
        (B, T, p, p, C): "Flatten each patch into one vector of p*p*C values.",
        (B, T, C, p, p): "Flatten each patch into one vector of p*p*C values, channels last.",
        (B, C, T, p * p): "The channels belong inside each token: [B, T, p*p*C].",
        (B, T, C, p * p): "Flatten each patch into one vector of p*p*C values, channels last.",
        (B, T, p * p, C): "Flatten each patch into one vector of p*p*C values.",
    }
    hints.pop((B, T, F), None)  # never a hint for the right shape
    return hints


def _check_patchify(label: str, fn) -> None:
    for k, (B, C, H, W, p) in enumerate(_PATCHIFY_CASES):
        x = torch.randn(B, C, H, W, generator=checks.seeded(100 + k))
        what = f"x of shape {(B, C, H, W)}, p={p}"
        try:
            got = checks.expect_tensor(label, checks.call(label, fn, x.clone(), p))
            checks.expect_shape(label, got, (B, (H // p) * (W // p), p * p * C), _patchify_shape_hints(B, C, H, W, p))
            variants = _patchify_variants(x, p)

            def diagnose(got, variants=variants, x=x):
                if checks.matches(got, x.reshape(got.shape)):
                    return (
                        "You reshaped x straight to [B, T, p*p*C] without permuting: the shape is right, but a "
                        "reshape only regroups values in memory order (rows of pixels), it does not cut patches. "
                        "View x as [B, C, h, p, w, p], permute to [B, h, w, p, p, C], then reshape."
                    )
                mistakes = _first_match(got, variants)
                return None if mistakes is None else _patchify_hint(mistakes)

            checks.expect_close(label, got, ref_patchify(x, p), atol=1e-6, rtol=1e-6, diagnose=diagnose, what="tokens")
        except ExerciseFailed as err:
            raise _with_input(err, what, earlier_passed=k > 0, non_square=H != W) from None
    _expect_same_dtype(label, fn, torch.randn(1, 2, 4, 6, generator=checks.seeded(99), dtype=torch.float64), 2)
    checks.passed(label)


def _expect_same_dtype(label: str, fn, x: torch.Tensor, *args) -> None:
    """Patchify and unpatchify only move values: a float64 input must come back float64 (the lesson compares
    float64 embeddings after Exercise 1.4, and a DiT may run in float64, bf16 or fp16)."""
    got = checks.expect_tensor(label, checks.call(label, fn, x.clone(), *args))
    checks.expect_dtype(
        label,
        got,
        x.dtype,
        f"Your function changed the dtype of a {x.dtype} input: it only moves values, so keep the input's dtype "
        "(no .float(), no torch.zeros/torch.empty without dtype=).",
    )


def check_patchify(fn) -> None:
    """Exercise 1.1: ``fn(x, p)``: [B, C, H, W] -> [B, T, p*p*C], row-major tokens, (p, q, c) inside a token."""
    _check_patchify("1.1 (patchify)", fn)


def check_patchify_einops(fn) -> None:
    """Exercise 1.2: the same as 1.1, written as one ``einops.rearrange`` pattern."""
    _check_patchify("1.2 (patchify_einops)", fn)


# --------------------------------------------------------------------------
# Exercise 1.3 (unpatchify)
# --------------------------------------------------------------------------

_UNPATCHIFY_CASES = [  # (B, h, p, c): square grids of h x h tokens, p != h
    (2, 4, 2, 4),
    (1, 3, 4, 3),
    (2, 2, 3, 8),  # 2C = 8 output channels, as the DiT with learned sigma
    (1, 5, 2, 2),
]


def _unpatchify_variants(tokens: torch.Tensor, p: int, c: int) -> list[tuple[tuple, torch.Tensor]]:
    h = w = math.isqrt(tokens.shape[1])
    out = []
    for grid, split, order in itertools.product(("(h w)", "(w h)"), _SPLITS, itertools.permutations("pqc")):
        mistakes = tuple(
            m
            for m in (
                "column_major" if grid == "(w h)" else None,
                _SPLITS[split],
                None if order == tuple("pqc") else order,
            )
            if m
        )
        pattern = f"b {grid} ({' '.join(order)}) -> b c {split[0]} {split[1]}"
        out.append((mistakes, rearrange(tokens, pattern, h=h, w=w, p=p, q=p, c=c)))
    return sorted(out, key=lambda v: len(v[0]))


def _unpatchify_hint(mistakes: tuple) -> str:
    if "column_major" in mistakes and ("q", "p", "c") in mistakes and len(mistakes) == 2:
        return (
            "The image comes out TRANSPOSED (H and W swapped): after viewing the tokens as [B, h, w, p, p, c], "
            "permute to [B, c, h, p, w, p]: grid row next to patch row, grid column next to patch column."
        )
    hints = []
    for m in mistakes:
        if m == "column_major":
            hints.append(
                "You place tokens column by column; the tokens are row-major: token t sits at grid row t // w, "
                "grid column t % w, so view the token axis as [h, w], not [w, h]."
            )
        elif m == "interleaved":
            hints.append(
                "Pixels of one patch land H/p apart: you put the patch axis before the grid axis ((p h) instead "
                "of (h p)). Permute to [B, c, h, p, w, p] before the final reshape."
            )
        elif m == ("c", "p", "q"):
            hints.append(
                "You read each token as (channel, patch row, patch column): channels first. The DiT's final "
                "layer emits each token as (patch row, patch column, channel): view the tokens as "
                "[B, h, w, p, p, c] (channels LAST), the reference's order."
            )
        elif m == ("q", "p", "c"):
            hints.append(
                "Each patch comes out transposed: pair the grid row h with the FIRST p of [B, h, w, p, p, c] "
                "(the patch row) and the grid column w with the second."
            )
        else:
            text = _patch_order_hint(m, reading=True)
            hints.append(text[0].upper() + text[1:])
    return " ".join(hints)


def check_unpatchify(fn) -> None:
    """Exercise 1.3: ``fn(x, p, c)``: [B, T, p*p*c] -> [B, c, h*p, w*p] (h = w = sqrt(T)), the inverse of patchify."""
    label = "1.3 (unpatchify)"
    for k, (B, h, p, c) in enumerate(_UNPATCHIFY_CASES):
        T, H = h * h, h * p
        tokens = torch.randn(B, T, p * p * c, generator=checks.seeded(200 + k))
        what = f"tokens of shape {(B, T, p * p * c)}, p={p}, c={c}"
        try:
            got = checks.expect_tensor(label, checks.call(label, fn, tokens.clone(), p, c))
            hints = {
                (B, H, H, c): "That is a channels-last image; the DiT (like every PyTorch conv net) returns "
                "[B, c, H, W]: permute the channel axis to the front.",
                (B, c, h, h, p, p): "Almost: finish with a reshape to [B, c, h*p, w*p] (after [B, c, h, p, w, p]).",
                (B, c, h, p, h, p): "Almost: finish with a reshape to [B, c, h*p, w*p].",
                (B, h, h, p, p, c): "You viewed the tokens as [B, h, w, p, p, c]; now permute to [B, c, h, p, w, p] "
                "and reshape to [B, c, h*p, w*p].",
                (B, c, T, p * p): "Put the pixels back on the image grid: [B, c, h*p, w*p].",
            }
            hints.pop((B, c, H, H), None)
            checks.expect_shape(label, got, (B, c, H, H), hints)
            variants = _unpatchify_variants(tokens, p, c)

            def diagnose(got, variants=variants, tokens=tokens):
                if checks.matches(got, tokens.reshape(got.shape)):
                    return (
                        "You reshaped the tokens straight to [B, c, H, W] without permuting: the shape is right, "
                        "but the pixels are scrambled. View the tokens as [B, h, w, p, p, c], permute to "
                        "[B, c, h, p, w, p], then reshape to [B, c, h*p, w*p]."
                    )
                mistakes = _first_match(got, variants)
                return None if mistakes is None else _unpatchify_hint(mistakes)

            checks.expect_close(
                label, got, ref_unpatchify(tokens, p, c), atol=1e-6, rtol=1e-6, diagnose=diagnose, what="pixels"
            )
        except ExerciseFailed as err:
            raise _with_input(err, what, earlier_passed=False, non_square=False) from None
    _expect_same_dtype(label, fn, torch.randn(1, 4, 12, generator=checks.seeded(98), dtype=torch.float64), 2, 3)
    checks.passed(label)


# --------------------------------------------------------------------------
# Exercise 1.4 (patch_embed_as_linear)
# --------------------------------------------------------------------------

_EMBED_CASES = [  # (C, D, p, dtype), D != p*p*C; float64 as in the lesson's own comparison after the check
    (4, 12, 2, torch.float32),
    (3, 8, 4, torch.float32),
    (2, 6, 3, torch.float64),
]


def _seeded_conv(C: int, D: int, p: int, seed: int, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    conv = nn.Conv2d(C, D, kernel_size=p, stride=p, bias=True, dtype=dtype)
    g = checks.seeded(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=dtype))
    return conv


_CONV_AXES = ("c", "p", "q")  # the axes 1, 2, 3 of a Conv2d weight [D, C, p, p]


def _weight_hint(got: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Name the flatten order of ``got`` [D, p*p*C] among the 6 orders of the conv weight's axes."""
    D = weight.shape[0]
    for order in itertools.permutations(_CONV_AXES):
        if order == ("p", "q", "c"):
            continue
        perm = [0] + [1 + _CONV_AXES.index(a) for a in order]
        if checks.matches(got, weight.permute(*perm).reshape(D, -1)):
            if order == ("c", "p", "q"):
                return (
                    "You flattened the Conv2d weight [D, C, p, p] in its own order (channel, patch row, patch "
                    "column): channels first. patchify's tokens are (p, q, c), channels last: the weight's "
                    "channel axis has to move behind the two patch axes before you flatten."
                )
            if order == ("q", "p", "c"):
                return (
                    "The patch row and column are swapped (each patch transposed): in a token the patch ROW varies "
                    "slowest, then the column, then the channel: [D, row, column, channel] before flattening."
                )
            return "Your weight is flattened as " + _patch_order_hint(order).split("as ", 1)[1]
    return None


def check_patch_embed_as_linear(fn) -> None:
    """Exercise 1.4: ``fn(conv)`` -> an ``nn.Linear(p*p*C, D)`` with ``linear(patchify(x, p))`` equal to the
    Conv2d patch embedding ``conv(x).flatten(2).transpose(1, 2)``."""
    label = "1.4 (patch_embed_as_linear)"
    for k, (C, D, p, dtype) in enumerate(_EMBED_CASES):
        conv = _seeded_conv(C, D, p, 300 + k, dtype)
        before = [t.detach().clone() for t in (conv.weight, conv.bias)]
        what = f"nn.Conv2d({C}, {D}, kernel_size={p}, stride={p}, dtype={dtype})"
        try:
            lin = checks.call(label, fn, conv)
            if isinstance(lin, torch.Tensor):
                checks.fail(
                    label,
                    "return an nn.Linear, not a tensor: build nn.Linear(p*p*C, D) and copy the weight and bias "
                    "into it (under torch.no_grad()).",
                )
            if not isinstance(lin, nn.Linear):
                checks.fail(label, f"return an nn.Linear, got {type(lin).__name__}.")
            if not all(torch.equal(a, b) for a, b in zip(before, (conv.weight, conv.bias))):
                checks.fail(label, "you modified the Conv2d's weight or bias in place: leave the conv as it is.")
            if lin.weight.dtype != dtype or (lin.bias is not None and lin.bias.dtype != dtype):
                checks.fail(
                    label,
                    f"the conv is {dtype} but your Linear is {lin.weight.dtype}: nn.Linear is created in float32 "
                    "unless you ask otherwise, and copy_ converts silently. Create it with the conv's dtype and "
                    "device, so that it runs on the same inputs as the conv (the comparison after this check is "
                    "in float64).",
                )
            if lin.weight.device != conv.weight.device:
                checks.fail(label, f"your Linear is on {lin.weight.device}, the conv on {conv.weight.device}.")
            weight = conv.weight.detach()
            checks.expect_shape(
                label,
                lin.weight,
                (D, p * p * C),
                {
                    (p * p * C, D): "nn.Linear keeps its weight as [out_features, in_features] = [D, p*p*C] "
                    "(y = x @ W.T + b): transpose it.",
                    (D, C, p, p): "Flatten the weight to [D, p*p*C].",
                    (D, p, p, C): "Flatten the weight to [D, p*p*C].",
                },
            )
            expected_w = weight.permute(0, 2, 3, 1).reshape(D, -1)
            checks.expect_close(
                label,
                lin.weight,
                expected_w,
                atol=1e-6,
                rtol=1e-6,
                diagnose=lambda g, weight=weight: _weight_hint(g, weight),
                what="weights",
            )
            if lin.bias is None:
                checks.fail(
                    label,
                    "your Linear has no bias, but the Conv2d adds conv.bias [D] to every token: create it with "
                    "bias=True and copy conv.bias into it.",
                )

            def bias_hint(g):
                if torch.all(g == 0):
                    return "Your bias is all zeros: copy conv.bias into it."
                return "Did you copy conv.bias? A fresh nn.Linear's bias is random."

            checks.expect_close(
                label, lin.bias, conv.bias.detach(), atol=1e-6, rtol=1e-6, diagnose=bias_hint, what="biases"
            )
            x = torch.randn(2, C, 3 * p, 2 * p, generator=checks.seeded(400 + k), dtype=dtype)
            with torch.no_grad():
                expected = conv(x).flatten(2).transpose(1, 2)
                got = checks.call(label, lin, ref_patchify(x, p))
            checks.expect_close(label, got, expected, atol=1e-5, rtol=1e-5, what="embeddings")
        except ExerciseFailed as err:
            raise _with_input(err, what, earlier_passed=False, non_square=False) from None
    checks.passed(label)


# --------------------------------------------------------------------------
# Exercise 1.5 (pos_embed)
# --------------------------------------------------------------------------

_POS_CASES = [(16, 3), (8, 5), (32, 4), (64, 6)]  # (D, grid size), D != grid_size**2


def _table(
    D: int,
    g: int,
    rows_first: bool = False,
    cos_first: bool = False,
    denominator: str = "D/4",
    one_based: bool = False,
    interleaved: bool = False,
) -> torch.Tensor:
    """A 2D sin-cos table with knobs for the usual mistakes (all off: the reference's table)."""
    quarter = D // 4
    denom = {"D/4": quarter, "D/4-1": quarter - 1, "D/2": D / 2, "D": D}[denominator]
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / denom)
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    halves = []
    for pos in (rows, cols) if rows_first else (cols, rows):
        angle = (pos.reshape(-1).astype(np.float64) + one_based)[:, None] * omega[None]
        parts = [np.cos(angle), np.sin(angle)] if cos_first else [np.sin(angle), np.cos(angle)]
        half = np.stack(parts, axis=2).reshape(len(angle), -1) if interleaved else np.concatenate(parts, axis=1)
        halves.append(half)
    return torch.from_numpy(np.concatenate(halves, axis=1))


_POS_HINTS = {
    "rows_first": "The halves are swapped: the FIRST D/2 channels must encode the COLUMN index (x), the last D/2 "
    "the ROW index (y). (Equivalently: your tokens run column by column instead of row by row.)",
    "cos_first": "Each half must be concat(sin, cos): sines first. (The timestep embedding of lesson 02 is the "
    "one that puts cos first.)",
    "denominator=D/4-1": "Your exponent divides by D/4 - 1 (the convention of DDPM and of diffusers' timestep "
    "embedding): omega_k = 1 / 10000^(k / (D/4)), k = 0 .. D/4-1, divides by D/4, the number of frequencies per 1D "
    "half, so the slowest frequency is 10000^(-(D/4-1)/(D/4)), not exactly 1/10000.",
    "denominator=D/2": "Your frequencies fall too slowly: omega_i = 1 / 10000^(i / (D/4)) with i = 0 .. D/4-1; "
    "the exponent divides by D/4 (the number of frequencies per 1D half), not by D/2.",
    "denominator=D": "Your frequencies fall too slowly: omega_i = 1 / 10000^(i / (D/4)); the exponent divides "
    "by D/4, not by D.",
    "one_based": "Positions start at 1: the first grid row and column have index 0.",
    "interleaved": "sin and cos are interleaved (sin, cos, sin, cos, ...): each half concatenates all D/4 sines, "
    "then all D/4 cosines.",
}


def _pos_variants(D: int, g: int) -> list[tuple[tuple, torch.Tensor]]:
    out = []
    for rows_first, cos_first, denominator, one_based, interleaved in itertools.product(
        (False, True), (False, True), ("D/4", "D/4-1", "D/2", "D"), (False, True), (False, True)
    ):
        mistakes = tuple(
            m
            for m, on in (
                ("rows_first", rows_first),
                ("cos_first", cos_first),
                (f"denominator={denominator}", denominator != "D/4"),
                ("one_based", one_based),
                ("interleaved", interleaved),
            )
            if on
        )
        if mistakes:
            out.append((mistakes, _table(D, g, rows_first, cos_first, denominator, one_based, interleaved)))
    return sorted(out, key=lambda v: len(v[0]))


def check_pos_embed(fn) -> None:
    """Exercise 1.5: ``fn(embed_dim, grid_size)`` -> the 2D sin-cos table [grid_size**2, embed_dim], float64."""
    label = "1.5 (pos_embed)"
    for D, g in _POS_CASES:
        what = f"embed_dim={D}, grid_size={g}"
        try:
            got = checks.call(label, fn, D, g)
            if isinstance(got, np.ndarray):
                checks.fail(
                    label,
                    f"you returned a numpy array ({got.dtype}): return a torch.Tensor. The cells after this check "
                    "use it as one (.float(), .norm(dim=1), table @ table.T); torch.from_numpy converts without a "
                    "copy.",
                )
            got = checks.expect_tensor(label, got)
            T = g * g
            hints = {
                (g, g, D): "Flatten the grid into T = grid_size**2 tokens, row by row: [T, D].",
                (D, T): "The table is transposed: one row per token, [T, D].",
                (1, T, D): "Return [T, D] without a batch axis (the model adds it when it stores pos_embed).",
                (T, D // 2): "Concatenate the column half and the row half: D/2 + D/2 = D channels.",
                (T, 2 * D): "Each 1D half has D/2 channels: D/4 frequencies, sin and cos.",
            }
            hints.pop((T, D), None)
            checks.expect_shape(label, got, (T, D), hints)
            expected = torch.from_numpy(get_2d_sincos_pos_embed(D, g))
            variants = _pos_variants(D, g)

            def diagnose(got, variants=variants, expected=expected):
                if checks.matches(got, expected.T):
                    return "The table is transposed: one row per token, [T, D]."
                mistakes = _first_match(got.double(), variants)
                return None if mistakes is None else " ".join(_POS_HINTS[m] for m in mistakes)

            checks.expect_close(label, got, expected, atol=1e-6, rtol=1e-6, diagnose=diagnose, what="table entries")
            if got.dtype != torch.float64:
                checks.fail(
                    label,
                    f"the values are right but the table is {got.dtype}: compute it in float64 (torch.float64), as "
                    "the reference does; the model casts it to float32 once, when it stores pos_embed.",
                )
        except ExerciseFailed as err:
            raise _with_input(err, what, earlier_passed=False, non_square=False) from None
    checks.passed(label)
