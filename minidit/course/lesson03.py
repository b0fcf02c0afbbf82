"""Checks of lesson 03 (attention and the DiT block): scaled dot-product attention, multi-head attention with a
fused qkv projection, the tanh-GELU MLP, and the DiT block with adaLN-Zero.

Each check runs the learner's code on seeded inputs of several shapes (cross-attention shapes with fewer keys than
queries, values wider than queries, batch size equal to the token count, small activations where the LayerNorm eps
shows), compares with ``minidit.attention`` / ``minidit.model`` and, on a mismatch, recomputes the known wrong
variants of the exercise (missing 1/sqrt(d), softmax over the queries, q/k/v in the wrong order, heads split as
(H, 3, d), exact GELU, wrong adaLN chunk order, eps 1e-5, missing gates, ...) to name the mistake in the hint.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, math_attention
from ..model import DiTBlock, Mlp
from . import checks
from .checks import ExerciseFailed

__all__ = ["check_attention", "check_multi_head", "check_mlp", "check_dit_block"]

ATTENTION = "3.1 (attention)"
MULTI_HEAD = "3.2 (multi_head)"
MLP = "3.3 (mlp)"
DIT_BLOCK = "3.4 (dit_block)"

Variant = tuple[str, Callable[[], torch.Tensor]]


def _first_match(got: torch.Tensor, variants: list[Variant]) -> str | None:
    """The hint of the first wrong variant that ``got`` equals (variants are computed lazily, on failure only)."""
    for hint, make in variants:
        try:
            candidate = make()
        except RuntimeError:  # a variant that cannot even be computed for this shape
            continue
        if checks.matches(got, candidate, atol=1e-5):
            return hint
    return None


def _with_input(err: ExerciseFailed, what: str) -> ExerciseFailed:
    """The failure, with the input it happened on (not for a stub: "not implemented" says it all)."""
    if "not implemented yet" in str(err):
        return err
    return ExerciseFailed(f"{err} [input: {what}]")


def _fill_(module: nn.Module, generator: torch.Generator, gain: float = 1.0, bias: float = 0.1) -> nn.Module:
    """Seeded weights for every parameter: Linear weights N(0, gain^2 / fan_in), biases N(0, bias^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * gain / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * bias)
    return module


# --------------------------------------------------------------------------
# Exercise 3.1 (attention)
# --------------------------------------------------------------------------

#: (B, H, N queries, M keys, d, d_v): self-attention, a cross-attention shape (M != N), values wider than q and k.
_ATTENTION_CASES = [(2, 3, 5, 5, 8, 8), (1, 2, 6, 4, 16, 16), (2, 1, 7, 7, 4, 10)]


def _softmax_attention(q, k, v, scale: float, dim: int = -1, transpose_scores: bool = False, softmax: bool = True):
    scores = (k @ q.transpose(-2, -1) if transpose_scores else q @ k.transpose(-2, -1)) * scale
    return (scores.softmax(dim=dim) if softmax else scores) @ v


def _attention_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[Variant]:
    d, d_v = q.shape[-1], v.shape[-1]
    s = 1 / math.sqrt(d)
    variants: list[Variant] = [
        (
            f"the 1/√d scale is missing: divide the scores q kᵀ by √d = √{d} before the softmax.",
            lambda: _softmax_attention(q, k, v, 1.0),
        ),
        (
            f"you divided the scores by d = {d} (or scaled q and k each by 1/√d); the scale is 1/√d = 1/√{d}.",
            lambda: _softmax_attention(q, k, v, 1 / d),
        ),
        (
            f"you multiplied the scores by √d = √{d}; the scale divides: q kᵀ / √d.",
            lambda: _softmax_attention(q, k, v, math.sqrt(d)),
        ),
        (
            "the softmax ran over the queries (dim=-2). Each query's row of scores must sum to 1 over the KEYS: "
            "softmax(dim=-1) on the [B, H, T, M] scores.",
            lambda: _softmax_attention(q, k, v, s, dim=-2),
        ),
        (
            "the softmax is missing: the weights are softmax(q kᵀ / √d), a probability distribution over the keys.",
            lambda: _softmax_attention(q, k, v, s, softmax=False),
        ),
    ]
    if d_v != d:
        variants.insert(
            0,
            (
                f"you scaled by 1/√{d_v} using the width of v; the scale uses the width of q and k: "
                f"d = q.shape[-1] = {d}.",
                lambda: _softmax_attention(q, k, v, 1 / math.sqrt(d_v)),
            ),
        )
    if q.shape[-2] == k.shape[-2]:
        variants.append(
            (
                "the scores are transposed: compute q @ k.transpose(-2, -1) (row i = query i), not k @ qᵀ.",
                lambda: _softmax_attention(q, k, v, s, transpose_scores=True),
            )
        )
    return variants


def check_attention(attention: Callable) -> None:
    """Exercise 3.1: ``attention(q, k, v)`` = softmax(q kᵀ / √d) v; q [B, H, T, d], k [B, H, M, d],
    v [B, H, M, d_v] -> [B, H, T, d_v]."""
    for n, (B, H, N, M, d, d_v) in enumerate(_ATTENTION_CASES):
        g = checks.seeded(30 + n)
        q, k = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, M, d, generator=g)
        v = torch.randn(B, H, M, d_v, generator=g)
        what = f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        try:
            got = checks.expect_tensor(ATTENTION, checks.call(ATTENTION, attention, q, k, v))
            expected = math_attention(q.double(), k.double(), v.double())
            hints = {
                (B, H, N, M): "that is the shape of the attention WEIGHTS softmax(q kᵀ/√d): multiply them by v.",
                (B, H, N, d): "the output has the width of the values, d_v = v.shape[-1], not that of q.",
                (B, H, M, d_v): "one output row per QUERY: the result is [B, H, T, d_v] with T = q.shape[-2].",
            }
            if (B, H, N, d_v) in hints:  # a correct shape is never diagnosed as a mistake
                del hints[(B, H, N, d_v)]
            checks.expect_shape(ATTENTION, got, (B, H, N, d_v), hints)
            checks.expect_close(
                ATTENTION,
                got,
                expected,
                diagnose=lambda got, q=q, k=k, v=v: _first_match(got, _attention_variants(q, k, v)),
            )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(ATTENTION)


# --------------------------------------------------------------------------
# Exercise 3.2 (multi_head)
# --------------------------------------------------------------------------

#: (B, N, D, H): every case has several heads, so a wrong head split shows.
_MULTI_HEAD_CASES = [(2, 5, 12, 3), (1, 7, 16, 4), (3, 4, 8, 2)]


def _multi_head(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    num_heads: int,
    order: tuple[int, int, int] = (0, 1, 2),
    layout: str = "3hd",
    merge: str = "transpose",
    out_proj: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention, right (the defaults) or with one of the usual slips."""
    B, N, D = x.shape
    H, d = num_heads, D // num_heads
    y = qkv(x)
    if layout == "3hd":
        y = y.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    elif layout == "h3d":
        y = y.reshape(B, N, H, 3, d).permute(3, 0, 2, 1, 4)
    else:  # "3dh"
        y = y.reshape(B, N, 3, d, H).permute(2, 0, 4, 1, 3)
    q, k, v = y[order[0]], y[order[1]], y[order[2]]  # [B, H, N, d]
    out = _softmax_attention(q, k, v, 1 / math.sqrt(d) if scale is None else scale)
    if merge == "transpose":
        out = out.transpose(1, 2).reshape(B, N, D)
    elif merge == "dh":  # heads interleaved: features laid out (d, H)
        out = out.permute(0, 2, 3, 1).reshape(B, N, D)
    else:
        out = out.reshape(B, N, D)
    return proj(out) if out_proj else out


def _multi_head_variants(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, H: int) -> list[Variant]:
    D = x.shape[-1]
    d = D // H
    names = "qkv"
    variants: list[Variant] = []
    for order in itertools.permutations((0, 1, 2)):
        if order != (0, 1, 2):
            took = ", ".join(f"{names[role]} = part {i}" for role, i in enumerate(order))
            variants.append(
                (
                    f"q, k and v are taken in the wrong order (you used {took}). The fused qkv output holds "
                    "[q | k | v] along its 3·D features, in that order: the first D features are q.",
                    lambda order=order: _multi_head(x, qkv, proj, H, order=order),
                )
            )
    variants += [
        (
            "the 3·D features of qkv(x) are laid out (3, H, d) — all of q, then all of k, then all of v — so "
            "view them as [B, T, 3, H, d], not [B, T, H, 3, d].",
            lambda: _multi_head(x, qkv, proj, H, layout="h3d"),
        ),
        (
            f"each of q, k, v splits its D features as (H, d): head h owns features h·d ... (h+1)·d − 1. "
            f"Reshape to (..., H, d) = (..., {H}, {d}), not (..., d, H).",
            lambda: _multi_head(x, qkv, proj, H, layout="3dh"),
        ),
        (
            "the heads are merged wrongly: reshaping the [B, H, T, d] output straight to [B, T, D] mixes the "
            "tokens of different heads. Bring the token axis next to the batch first, [B, T, H, d], then merge.",
            lambda: _multi_head(x, qkv, proj, H, merge="reshape"),
        ),
        (
            "the heads are merged in the wrong order: each token's D features must come back laid out (H, d), "
            "head 0's d features first, then head 1's, as qkv split them. Yours are (d, H): the heads are "
            "interleaved feature by feature, so proj reads every head's output in the wrong place.",
            lambda: _multi_head(x, qkv, proj, H, merge="dh"),
        ),
        (
            "the output projection is missing: return proj(merged heads).",
            lambda: _multi_head(x, qkv, proj, H, out_proj=False),
        ),
        (
            f"you scaled by 1/√D = 1/√{D}; each head scales by 1/√d_head with d_head = D / num_heads = {d}.",
            lambda: _multi_head(x, qkv, proj, H, scale=1 / math.sqrt(D)),
        ),
        (
            f"the 1/√d scale is missing (d = D / num_heads = {d}).",
            lambda: _multi_head(x, qkv, proj, H, scale=1.0),
        ),
        (
            f"you ran ONE head over all D = {D} features: split q, k, v into num_heads = {H} heads of "
            f"d = {d} features each, attend within each head, then merge.",
            lambda: _multi_head(x, qkv, proj, 1),
        ),
        (
            "the heads are merged wrongly AND the output projection is missing.",
            lambda: _multi_head(x, qkv, proj, H, merge="reshape", out_proj=False),
        ),
    ]
    return variants


def check_multi_head(multi_head_attention: Callable) -> None:
    """Exercise 3.2: ``multi_head_attention(x, qkv, proj, num_heads)`` equals ``minidit.attention.Attention``
    with the same ``qkv`` and ``proj`` Linears. x [B, T, D] -> [B, T, D]."""
    for n, (B, N, D, H) in enumerate(_MULTI_HEAD_CASES):
        g = checks.seeded(40 + n)
        ref = _fill_(Attention(D, H, backend="math"), g)
        x = torch.randn(B, N, D, generator=g)
        what = f"x {list(x.shape)}, num_heads={H}"
        try:
            with torch.no_grad():
                got = checks.call(MULTI_HEAD, multi_head_attention, x, ref.qkv, ref.proj, H)
                got = checks.expect_tensor(MULTI_HEAD, got)
                expected = ref(x)
                hints = {(B, H, N, D // H): "merge the heads back to [B, T, D] (and apply proj)."}
                checks.expect_shape(MULTI_HEAD, got, (B, N, D), hints)
                checks.expect_close(
                    MULTI_HEAD,
                    got,
                    expected,
                    diagnose=lambda got, x=x, ref=ref, H=H: _first_match(
                        got, _multi_head_variants(x, ref.qkv, ref.proj, H)
                    ),
                )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(MULTI_HEAD)


# --------------------------------------------------------------------------
# Exercise 3.3 (mlp)
# --------------------------------------------------------------------------

#: (B, N, D); the hidden width is 4D. fc1's weights are large enough that pre-activations reach |h| ~ 6,
#: where the exact and the tanh GELU differ by up to 5e-4.
_MLP_CASES = [(2, 5, 8), (1, 3, 12), (3, 2, 6)]

_TANH_FORMULA = "0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³)))"


def _mlp_variants(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> list[Variant]:
    c = math.sqrt(2 / math.pi)
    tanh_hint = f'(the reference: nn.GELU(approximate="tanh"), i.e. {_TANH_FORMULA})'
    return [
        (
            "you used the EXACT (erf) GELU, nn.GELU() / F.gelu(h) with its default approximate='none'. The DiT "
            f"uses the tanh approximation {tanh_hint}; outputs differ by up to ~5e-4 per unit, which a "
            "checkpoint trained with tanh notices.",
            lambda: fc2(F.gelu(fc1(x))),
        ),
        (
            f"that is ReLU; the DiT's MLP uses GELU with the tanh approximation {tanh_hint}.",
            lambda: fc2(F.relu(fc1(x))),
        ),
        (
            f"that is SiLU, the activation of adaLN_modulation, not of the MLP; use GELU with the tanh approximation "
            f"{tanh_hint}.",
            lambda: fc2(F.silu(fc1(x))),
        ),
        (
            f"that is the sigmoid approximation of GELU, h·σ(1.702·h) ('quick GELU'); use the tanh approximation "
            f"{tanh_hint}.",
            lambda: fc2(fc1(x) * torch.sigmoid(1.702 * fc1(x))),
        ),
        (
            f"the 0.044715·h³ term is missing from your tanh formula: {_TANH_FORMULA}.",
            lambda: fc2(0.5 * fc1(x) * (1 + torch.tanh(c * fc1(x)))),
        ),
        ("there is no activation between fc1 and fc2: fc2(GELU_tanh(fc1(x))).", lambda: fc2(fc1(x))),
        (
            "the activation goes BETWEEN fc1 and fc2, not after fc2.",
            lambda: F.gelu(fc2(fc1(x)), approximate="tanh"),
        ),
        (
            f"your GELU is twice too large: the leading factor ½ is missing from {_TANH_FORMULA}.",
            lambda: fc2(fc1(x) * (1 + torch.tanh(c * (fc1(x) + 0.044715 * fc1(x) ** 3)))),
        ),
        (
            f"the constant is √(2/π) ≈ 0.798, not √(2π) ≈ 2.507: {_TANH_FORMULA}.",
            lambda: fc2(0.5 * fc1(x) * (1 + torch.tanh(math.sqrt(2 * math.pi) * (fc1(x) + 0.044715 * fc1(x) ** 3)))),
        ),
        (
            f"0.044715 multiplies h³ inside the bracket that √(2/π) multiplies: {_TANH_FORMULA}.",
            lambda: fc2(0.5 * fc1(x) * (1 + torch.tanh(c * fc1(x) + 0.044715 * fc1(x) ** 3))),
        ),
        (
            f"that is h·tanh(...) without the 1 +: {_TANH_FORMULA}.",
            lambda: fc2(0.5 * fc1(x) * torch.tanh(c * (fc1(x) + 0.044715 * fc1(x) ** 3))),
        ),
    ]


def _hidden_gelu(*args, **kwargs):
    raise ExerciseFailed(
        f"Exercise {MLP}: write the tanh GELU yourself, from its equation; F.gelu and nn.GELU are switched off "
        "while this check runs."
    )


def check_mlp(mlp: Callable) -> None:
    """Exercise 3.3: ``mlp(x, fc1, fc2)`` = fc2(GELU_tanh(fc1(x))) equals ``minidit.model.Mlp``.
    x [B, N, D] -> [B, N, D]."""
    for n, (B, N, D) in enumerate(_MLP_CASES):
        g = checks.seeded(50 + n)
        ref = Mlp(D, 4 * D)
        _fill_(ref.fc1, g, gain=2.5, bias=1.0)
        _fill_(ref.fc2, g)
        x = torch.randn(B, N, D, generator=g)
        what = f"x {list(x.shape)}, fc1 Linear({D}, {4 * D}), fc2 Linear({4 * D}, {D})"
        try:
            with torch.no_grad():
                expected = ref(x)
                gelu = F.gelu
                F.gelu = _hidden_gelu  # the learner writes the activation; nn.GELU calls F.gelu too
                try:
                    got = checks.expect_tensor(MLP, checks.call(MLP, mlp, x, ref.fc1, ref.fc2))
                finally:
                    F.gelu = gelu
                checks.expect_dtype(MLP, got, x.dtype, "The MLP keeps the dtype of its input (no .double()).")
                hints = {(B, N, 4 * D): f"that is fc1's output width 4D = {4 * D}: did you forget fc2?"}
                checks.expect_shape(MLP, got, (B, N, D), hints)
                checks.expect_close(
                    MLP,
                    got,
                    expected,
                    atol=2e-6,
                    rtol=2e-6,
                    diagnose=lambda got, x=x, ref=ref: _first_match(got, _mlp_variants(x, ref.fc1, ref.fc2)),
                )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(MLP)


# --------------------------------------------------------------------------
# Exercise 3.4 (dit_block)
# --------------------------------------------------------------------------

#: (B, T, D, H, scale of x). B == T first: forgetting unsqueeze(1) then broadcasts silently instead of crashing.
#: The last case has small activations (x * 0.01), where LayerNorm's eps 1e-6 vs 1e-5 shows.
_BLOCK_CASES = [(3, 3, 16, 4, 1.0), (2, 7, 12, 3, 1.0), (2, 5, 8, 2, 0.01)]

_CHUNK_HINT = (
    "You split adaLN_modulation(c) with chunk(6) and no dim: chunk splits dim 0, the BATCH axis, by default. "
    "The six vectors lie side by side along the feature axis of [B, 6D]: split that axis."
)
_NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def _block(
    ref: DiTBlock,
    x: torch.Tensor,
    c: torch.Tensor,
    order: tuple[int, ...] = (0, 1, 2, 3, 4, 5),
    eps: float = 1e-6,
    gates: tuple[bool, bool] = (True, True),
    one_plus: bool = True,
    modulate_after: bool = False,
    reuse_ln: bool = False,
    unsqueeze: bool = True,
    silu: bool = True,
    post_norm: bool = False,
    post_norm_modulated: bool = False,
    residual: bool = True,
) -> torch.Tensor:
    """The DiT block, right (the defaults) or with one of the usual slips, on ``ref``'s weights.
    ``order[i]`` is the chunk that the i-th name of ``_NAMES`` receives."""
    chunks = ref.adaLN_modulation[1](F.silu(c) if silu else c).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (chunks[i] for i in order)

    def u(t):
        return t.unsqueeze(1) if unsqueeze else t

    def mod(h, shift, scale):
        return h * (1 + u(scale) if one_plus else u(scale)) + u(shift)

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=eps)

    def branch(h, fn, shift, scale):
        return mod(fn(h), shift, scale) if modulate_after else fn(mod(h, shift, scale))

    def add(x, gate, use_gate, out):
        return (x if residual else 0) + (u(gate) * out if use_gate else out)

    if post_norm_modulated:  # post-norm, with modulate applied to the LayerNorm's output
        x = mod(ln(add(x, gate_msa, gates[0], ref.attn(x))), shift_msa, scale_msa)
        return mod(ln(add(x, gate_mlp, gates[1], ref.mlp(x))), shift_mlp, scale_mlp)
    if post_norm:
        x = ln(add(x, gate_msa, gates[0], ref.attn(mod(x, shift_msa, scale_msa))))
        return ln(add(x, gate_mlp, gates[1], ref.mlp(mod(x, shift_mlp, scale_mlp))))
    h = ln(x)
    x1 = add(x, gate_msa, gates[0], branch(h, ref.attn, shift_msa, scale_msa))
    return add(x1, gate_mlp, gates[1], branch(h if reuse_ln else ln(x1), ref.mlp, shift_mlp, scale_mlp))


_PLAUSIBLE_ORDERS = {
    (1, 0, 2, 4, 3, 5): "shift and scale are swapped",
    (0, 2, 4, 1, 3, 5): "you unpacked them grouped by kind (shift_msa, shift_mlp, scale_msa, ...)",
    (3, 4, 5, 0, 1, 2): "the MLP's three come first in your unpacking",
    (1, 2, 0, 4, 5, 3): "you unpacked each branch as (gate, shift, scale)",
    (2, 0, 1, 5, 3, 4): "you unpacked each branch as (scale, gate, shift)",
}
_ORDER = (
    "(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp): chunks 0 to 5 of adaLN_modulation(c) "
    "along its feature axis"
)


def _order_hint(order: tuple[int, ...], why: str | None = None) -> str:
    got = ", ".join(f"{name} = chunk {i}" for name, i in zip(_NAMES, order) if _NAMES.index(name) != i)
    why = f"{why}: " if why else ""
    return f"the six adaLN vectors are in the wrong order ({why}{got}). The order is: {_ORDER}."


def _block_variants(ref: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> list[Variant]:
    B, T, _ = x.shape
    variants: list[Variant] = [
        (
            "LayerNorm eps: the DiT's LayerNorms use eps=1e-6, not PyTorch's default 1e-5 (F.layer_norm and "
            "nn.LayerNorm default to 1e-5).",
            lambda: _block(ref, x, c, eps=1e-5),
        ),
        (
            "the gates are missing: x = x + gate_msa·Attn(...) and x = x + gate_mlp·MLP(...). Without them the "
            "block is not the identity at initialisation (adaLN-Zero).",
            lambda: _block(ref, x, c, gates=(False, False)),
        ),
        (
            "gate_msa is missing from the attention branch: x = x + gate_msa·Attn(...).",
            lambda: _block(ref, x, c, gates=(False, True)),
        ),
        (
            "gate_mlp is missing from the MLP branch: x = x + gate_mlp·MLP(...).",
            lambda: _block(ref, x, c, gates=(True, False)),
        ),
        (
            "modulate is h·(1 + scale) + shift; you used h·scale + shift (the '1 +' makes a zero scale the identity).",
            lambda: _block(ref, x, c, one_plus=False),
        ),
        (
            "modulate the normalised INPUT of each branch (pre-norm): Attn(modulate(LN(x), shift, scale)), not "
            "modulate(Attn(LN(x)), shift, scale).",
            lambda: _block(ref, x, c, modulate_after=True),
        ),
        (
            "the MLP branch must normalise the UPDATED x, after the attention residual: LN(x) computed once and "
            "reused for both branches makes a 'parallel' block, not the DiT's.",
            lambda: _block(ref, x, c, reuse_ln=True),
        ),
        (
            "adaLN_modulation is SiLU then Linear: call self.adaLN_modulation(c), not its Linear alone.",
            lambda: _block(ref, x, c, silu=False),
        ),
        (
            "the residual connections are missing: x = x + gate·branch(...), keep the x.",
            lambda: _block(ref, x, c, residual=False),
        ),
        (
            "this is a post-norm block (LN after the residual add). The DiT is pre-norm: x = x + gate·Attn(modulate("
            "LN(x), ...)); the residual stream itself is never normalised.",
            lambda: _block(ref, x, c, post_norm=True),
        ),
        (
            "this is a post-norm block: you add the residual first and then normalise and modulate. The DiT is "
            "pre-norm: each branch normalises and modulates its INPUT, x + gate·f(modulate(LN(x), shift, scale)); "
            "the residual stream itself is never normalised.",
            lambda: _block(ref, x, c, post_norm_modulated=True),
        ),
        (
            "the MLP branch reuses the attention branch's shift and scale: each branch has its own three vectors, "
            "and the MLP's are the last three (chunks 3, 4, 5).",
            lambda: _block(ref, x, c, order=(0, 1, 2, 0, 1, 5)),
        ),
        (
            "the MLP branch reuses the attention branch's shift, scale and gate: each branch has its own three "
            "vectors, and the MLP's are the last three (chunks 3, 4, 5).",
            lambda: _block(ref, x, c, order=(0, 1, 2, 0, 1, 2)),
        ),
    ]
    if B == T:
        variants.append(
            (
                f"shift, scale and gate are [B, D]: unsqueeze(1) them to [B, 1, D] so they broadcast over the tokens. "
                f"Here B = T = {B}, so [B, D] silently broadcast as [1, T, D]: one vector per TOKEN instead of per "
                "image.",
                lambda: _block(ref, x, c, unsqueeze=False),
            )
        )
    variants += [
        (_order_hint(order, why), lambda order=order: _block(ref, x, c, order=order))
        for order, why in _PLAUSIBLE_ORDERS.items()
    ]
    return variants


def _diagnose_block(got: torch.Tensor, ref: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> str | None:
    hint = _first_match(got, _block_variants(ref, x, c))
    if hint is not None:
        return hint
    for order in itertools.permutations(range(6)):  # any other order of the six vectors (720, only on failure)
        if order != tuple(range(6)) and order not in _PLAUSIBLE_ORDERS:
            if checks.matches(got, _block(ref, x, c, order=order)):
                return _order_hint(order)
    return None


def _check_layer_norms(block: nn.Module) -> None:
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if isinstance(norm, nn.LayerNorm):
            if norm.elementwise_affine:
                checks.fail(
                    DIT_BLOCK,
                    f"{name} has learnable weight and bias. The DiT's LayerNorms have none (the adaLN shift and "
                    "scale replace them): nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6).",
                )
            if norm.eps != 1e-6:
                checks.fail(DIT_BLOCK, f"{name} has eps={norm.eps:g}; the DiT's LayerNorms use eps=1e-6.")


def _load(block: nn.Module, ref: DiTBlock) -> None:
    """The reference weights into the learner's block, strictly: the checkpoint layout must match."""
    try:
        missing, unexpected = block.load_state_dict(ref.state_dict(), strict=False)
    except RuntimeError as e:
        checks.fail(DIT_BLOCK, f"the reference weights do not fit your block: {str(e).splitlines()[-1].strip()}")
    if missing or unexpected:
        checks.fail(
            DIT_BLOCK,
            f"your block's parameters do not match the reference layout (missing: {list(missing)}, unexpected: "
            f"{list(unexpected)}). Keep the submodules of the skeleton (attn, mlp, adaLN_modulation) and give the "
            "LayerNorms no parameters.",
        )


def check_dit_block(block_class: type) -> None:
    """Exercise 3.4: ``block_class(hidden_size, num_heads)`` with the reference's weights computes the same
    x [B, T, D], c [B, D] -> [B, T, D] as ``minidit.model.DiTBlock``, and is the identity when adaLN is zero."""
    for n, (B, T, D, H, x_scale) in enumerate(_BLOCK_CASES):
        g = checks.seeded(60 + n)
        ref = _fill_(DiTBlock(D, H, attn_backend="math"), g, bias=0.3)
        x = torch.randn(B, T, D, generator=g) * x_scale
        c = torch.randn(B, D, generator=g)
        what = f"x {list(x.shape)}" + (f" (small: x·{x_scale:g})" if x_scale != 1 else "") + f", c {list(c.shape)}"
        try:
            block = checks.call(DIT_BLOCK, block_class, D, H)
            if not isinstance(block, nn.Module):
                checks.fail(DIT_BLOCK, f"DiTBlock({D}, {H}) should build an nn.Module, got {type(block).__name__}.")
            _check_layer_norms(block)
            _load(block, ref)
            block.eval()
            with torch.no_grad():
                got = checks.call_watching_chunks(DIT_BLOCK, block, x, c, chunks=6, hint=_CHUNK_HINT)
                got = checks.expect_tensor(DIT_BLOCK, got)
                expected = ref(x, c)
                hints = {(B, T, 6 * D): "chunk the [B, 6D] modulation into six [B, D] vectors along dim=1."}
                checks.expect_shape(DIT_BLOCK, got, (B, T, D), hints)
                checks.expect_close(
                    DIT_BLOCK, got, expected, diagnose=lambda got, ref=ref, x=x, c=c: _diagnose_block(got, ref, x, c)
                )
                # adaLN-Zero: with the modulation Linear at zero every gate is 0 and the block is the identity.
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
                got = checks.call(DIT_BLOCK, block, x, c)
                checks.expect_close(
                    DIT_BLOCK,
                    got,
                    x,
                    atol=1e-7,
                    rtol=1e-7,
                    what="with adaLN_modulation zeroed (every gate 0) the block should return x unchanged; values",
                )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(DIT_BLOCK)
