"""Checks of lesson 12 (descendants of DiT): cross-attention to text tokens with a padding mask, PixArt-α's block
with adaLN-single, the parameters adaLN-single saves, SD3's MMDiT block with joint attention, and Sora-style
spacetime patches.

Each check runs the learner's code on seeded inputs (padded captions of different lengths, text and image token
counts that differ, several heads), compares with ``minidit.captions`` / ``minidit.video`` / ``minidit.model``
and, on a mismatch, recomputes the known wrong variants of the exercise (mask inverted or ignored, keys and values
swapped, the table of adaLN-single forgotten, a gate on the cross-attention, two self-attentions instead of one
joint attention, the text stream left unchanged, channels first in a tubelet, space-major token order, ...) to
name the mistake in the hint.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from ..captions import MMDiTBlock, MultiHeadCrossAttention, PixArtBlock, masked_attention
from ..model import DiTBlock, modulate
from ..video import patchify_spacetime as reference_patchify_spacetime
from . import checks
from .checks import ExerciseFailed
from .lesson03 import _fill_, _first_match, _with_input

__all__ = [
    "check_cross_attention",
    "check_pixart_block",
    "check_adaln_parameters",
    "check_mmdit_block",
    "check_patchify_spacetime",
]

CROSS = "12.1 (cross_attention)"
PIXART = "12.2 (pixart_block)"
PARAMS = "12.3 (adaln_parameters)"
MMDIT = "12.4 (mmdit_block)"
SPACETIME = "12.5 (patchify_spacetime)"

Variant = tuple[str, Callable[[], torch.Tensor]]


def _padding_mask(lengths: list[int], L: int) -> torch.Tensor:
    """bool [B, L]: True for the first ``lengths[b]`` tokens of row b (real), False after (padding)."""
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]


def _text(B: int, L: int, D: int, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Seeded text tokens [B, L, D]; padded positions hold large values, so attending to them shows."""
    y = torch.randn(B, L, D, generator=g)
    return torch.where(mask[..., None], y, 5 * torch.randn(B, L, D, generator=g))


def _nan_hint(got: torch.Tensor) -> str | None:
    if torch.isnan(got).any():
        return (
            "your output holds NaN: some query had every key masked (softmax over a row of -inf is 0/0). Did you "
            "invert the mask? mask is True for REAL text tokens (those that may be attended), False for padding."
        )
    return None


# --------------------------------------------------------------------------
# Exercise 12.1 (cross_attention)
# --------------------------------------------------------------------------

#: (B, T image tokens, L text tokens, D, H, real lengths of the captions). Every batch mixes lengths.
_CROSS_CASES = [(2, 6, 5, 16, 4, [5, 2]), (3, 4, 7, 12, 3, [1, 7, 4]), (2, 5, 5, 8, 2, [3, 5])]


def _cross(
    x, y, mask, q_linear, kv_linear, proj, H,
    use_mask: str = "right", kv_layout: str = "2hd", swap_kv: bool = False, scale: float | None = None,
    out_proj: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Cross-attention, right (the defaults) or with one of the usual slips."""
    (B, T, D), L = x.shape, y.shape[1]
    d = D // H
    q = q_linear(x).view(B, T, H, d).transpose(1, 2)
    kv = kv_linear(y)
    if kv_layout == "2hd":
        k, v = kv.view(B, L, 2, H, d).permute(2, 0, 3, 1, 4)
    else:  # (H, 2, d): each head's k and v side by side
        k, v = kv.view(B, L, H, 2, d).permute(3, 0, 2, 1, 4)
    if swap_kv:
        k, v = v, k
    s = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(d) if scale is None else scale)  # [B, H, T, L]
    keep = mask[:, None, None, :]
    if use_mask == "right":
        a = s.masked_fill(~keep, float("-inf")).softmax(-1)
    elif use_mask == "none":
        a = s.softmax(-1)
    elif use_mask == "after":  # zeroed after the softmax, not renormalised
        a = s.softmax(-1) * keep
    elif use_mask == "add":  # the boolean mask added as 0/1
        a = (s + keep.to(s.dtype)).softmax(-1)
    elif use_mask == "times":  # scores multiplied by the mask: padding gets score 0, not -inf
        a = (s * keep).softmax(-1)
    else:  # "inverted", with a large finite number (-inf gives NaN rows, which _nan_hint names)
        a = s.masked_fill(keep, -1e9).softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(B, T, D)
    return proj(out) if out_proj else out


def _cross_variants(x, y, mask, ref: MultiHeadCrossAttention) -> list[Variant]:
    H, d = ref.num_heads, x.shape[-1] // ref.num_heads
    args = (x, y, mask, ref.q_linear, ref.kv_linear, ref.proj, H)
    return [
        (
            "the padded text tokens are attended: apply the mask. Scores of keys where mask is False must be -inf "
            "BEFORE the softmax (masked_fill(~mask, -inf), or F.scaled_dot_product_attention(..., attn_mask=...) "
            "with the mask broadcast to [B, 1, 1, L]).",
            lambda: _cross(*args, use_mask="none"),
        ),
        (
            "you zeroed the padded keys' weights AFTER the softmax, so each row no longer sums to 1 over the real "
            "tokens. Mask the scores before the softmax (-inf where mask is False).",
            lambda: _cross(*args, use_mask="after"),
        ),
        (
            "you added the boolean mask to the scores (+1 for real tokens, +0 for padding): padding still gets "
            "weight. Padded keys need a score of -inf (masked_fill(~mask, float('-inf'))).",
            lambda: _cross(*args, use_mask="add"),
        ),
        (
            "you multiplied the scores by the mask: a padded key then has score 0, which still gets weight e^0 "
            "in the softmax. Padded keys need a score of -inf.",
            lambda: _cross(*args, use_mask="times"),
        ),
        (
            "you masked the REAL tokens: y_mask is True for the tokens that may be attended (the caption's words) "
            "and False for padding; fill the scores with -inf where it is False.",
            lambda: _cross(*args, use_mask="inverted"),
        ),
        (
            "keys and values are swapped: kv_linear(y) holds [k | v] along its 2·D features, k first.",
            lambda: _cross(*args, swap_kv=True),
        ),
        (
            f"the 2·D features of kv_linear(y) are laid out (2, H, d): all of k, then all of v (view them as "
            f"[B, L, 2, H, d]), not (H, 2, d) = ({H}, 2, {d}).",
            lambda: _cross(*args, kv_layout="h2d"),
        ),
        (
            f"the 1/√d scale is missing (d = D / num_heads = {d}).",
            lambda: _cross(*args, scale=1.0),
        ),
        (
            f"you scaled by 1/√D; each head scales by 1/√d with d = D / num_heads = {d}.",
            lambda: _cross(*args, scale=1 / math.sqrt(x.shape[-1])),
        ),
        ("the output projection is missing: return proj(merged heads).", lambda: _cross(*args, out_proj=False)),
    ]


def check_cross_attention(cross_attention: Callable) -> None:
    """Exercise 12.1: ``cross_attention(x, y, y_mask, q_linear, kv_linear, proj, num_heads)`` equals
    ``minidit.captions.MultiHeadCrossAttention`` holding the same Linears. x [B, T, D] image tokens, y [B, L, D]
    text tokens, y_mask bool [B, L] (True: a real token) -> [B, T, D]."""
    for n, (B, T, L, D, H, lengths) in enumerate(_CROSS_CASES):
        g = checks.seeded(120 + n)
        ref = _fill_(MultiHeadCrossAttention(D, H), g)
        mask = _padding_mask(lengths, L)
        x, y = torch.randn(B, T, D, generator=g), _text(B, L, D, mask, g)
        what = f"x {list(x.shape)}, y {list(y.shape)}, caption lengths {lengths}, num_heads={H}"
        try:
            with torch.no_grad():
                got = checks.call(CROSS, cross_attention, x, y, mask, ref.q_linear, ref.kv_linear, ref.proj, H)
                got = checks.expect_tensor(CROSS, got)
                checks.expect_dtype(CROSS, got, x.dtype, "Keep the dtype of the tokens (no .double()).")
                hints = {
                    (B, L, D): "one output row per IMAGE token: the queries come from x, the keys and values from y.",
                    (B, H, T, D // H): "merge the heads back to [B, T, D] (and apply proj).",
                }
                checks.expect_shape(CROSS, got, (B, T, D), hints)
                checks.expect_close(
                    CROSS,
                    got,
                    ref(x, y, mask),
                    diagnose=lambda got, x=x, y=y, mask=mask, ref=ref: (
                        _nan_hint(got) or _first_match(got, _cross_variants(x, y, mask, ref))
                    ),
                )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(CROSS)


# --------------------------------------------------------------------------
# Exercise 12.2 (pixart_block)
# --------------------------------------------------------------------------

#: (B, T, L, D, H, lengths). B == L in the first case, so a table or a t6 reshaped along the wrong axis
#: broadcasts instead of crashing.
_PIXART_CASES = [(3, 5, 3, 12, 3, [3, 1, 2]), (2, 4, 6, 16, 4, [6, 3])]

_NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
_CHUNK_HINT = (
    "You split a [B, 6D] tensor with chunk(6) and no dim: chunk splits dim 0, the BATCH axis, by default. "
    "The six vectors lie side by side along the feature axis."
)


def _pixart(
    block: PixArtBlock, x, y, t6, mask,
    order: tuple[int, ...] = (0, 1, 2, 3, 4, 5), table: bool = True, use_t6: bool = True, cross: str = "middle",
    cross_gate: bool = False, cross_norm: bool = False, use_mask: bool = True, gates: bool = True,
    one_plus: bool = True, mlp_reuses_attn: bool = False,
) -> torch.Tensor:  # fmt: skip
    """PixArt-α's block, right (the defaults) or with one of the usual slips, on ``block``'s weights."""
    B, D = x.shape[0], x.shape[-1]
    six = torch.zeros(B, 6, D)
    if table:
        six = six + block.scale_shift_table[None]
    if use_t6:
        six = six + t6.view(B, 6, D)
    chunks = six.unbind(1)  # [B, D] each
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (chunks[i] for i in order)
    if mlp_reuses_attn:
        shift_mlp, scale_mlp = shift_msa, scale_msa

    def mod(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None] if one_plus else h * scale[:, None] + shift[:, None]

    def gate(g, out):
        return g[:, None] * out if gates else out

    def ca(x):
        h = block.norm1(x) if cross_norm else x
        out = block.cross_attn(h, y, mask if use_mask else None)
        return x + (gate_msa[:, None] * out if cross_gate else out)

    if cross == "first":
        x = ca(x)
    x = x + gate(gate_msa, block.attn(mod(block.norm1(x), shift_msa, scale_msa)))
    if cross == "middle":
        x = ca(x)
    x = x + gate(gate_mlp, block.mlp(mod(block.norm2(x), shift_mlp, scale_mlp)))
    if cross == "last":
        x = ca(x)
    return x


def _pixart_variants(block, x, y, t6, mask) -> list[Variant]:
    args = (block, x, y, t6, mask)
    return [
        (
            "the block's scale_shift_table is missing: adaLN-single's six vectors are the shared t6 PLUS this "
            "block's own table, (scale_shift_table[None] + t6 viewed as [B, 6, D]).",
            lambda: _pixart(*args, table=False),
        ),
        (
            "t6 is missing: the six vectors are scale_shift_table + t6 (the table alone does not depend on t).",
            lambda: _pixart(*args, use_t6=False),
        ),
        (
            "shift and scale are swapped: the six rows are (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, "
            "gate_mlp), in that order, as in DiT.",
            lambda: _pixart(*args, order=(1, 0, 2, 4, 3, 5)),
        ),
        (
            "you unpacked the six grouped by kind (shift_msa, shift_mlp, scale_msa, ...); the order is (shift_msa, "
            "scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).",
            lambda: _pixart(*args, order=(0, 2, 4, 1, 3, 5)),
        ),
        (
            "the cross-attention branch has no gate in PixArt-α: x = x + cross_attn(x, y, y_mask). gate_msa "
            "belongs to the self-attention branch only.",
            lambda: _pixart(*args, cross_gate=True),
        ),
        (
            "the cross-attention reads x itself, not LN(x): in PixArt-α the branch is x + cross_attn(x, y, y_mask), "
            "with no LayerNorm and no modulation.",
            lambda: _pixart(*args, cross_norm=True),
        ),
        (
            "the cross-attention comes BETWEEN self-attention and the MLP (PixArt-α §2.3); yours runs first.",
            lambda: _pixart(*args, cross="first"),
        ),
        (
            "the cross-attention comes BETWEEN self-attention and the MLP (PixArt-α §2.3); yours runs last.",
            lambda: _pixart(*args, cross="last"),
        ),
        (
            "the cross-attention branch is missing: x = x + block.cross_attn(x, y, y_mask) after the self-attention.",
            lambda: _pixart(*args, cross="none"),
        ),
        (
            "y_mask was not passed to the cross-attention: the padded text tokens are attended.",
            lambda: _pixart(*args, use_mask=False),
        ),
        (
            "the gates are missing: x = x + gate_msa·Attn(...) and x = x + gate_mlp·MLP(...).",
            lambda: _pixart(*args, gates=False),
        ),
        (
            "modulate is h·(1 + scale) + shift; you used h·scale + shift.",
            lambda: _pixart(*args, one_plus=False),
        ),
        (
            "the MLP branch reuses the attention's shift and scale; it has its own, shift_mlp and scale_mlp.",
            lambda: _pixart(*args, mlp_reuses_attn=True),
        ),
    ]


def check_pixart_block(pixart_block: Callable) -> None:
    """Exercise 12.2: ``pixart_block(block, x, y, t6, y_mask)`` equals ``block(x, y, t6, y_mask)`` for a
    ``minidit.captions.PixArtBlock`` with seeded weights. x [B, T, D], y [B, L, D], t6 [B, 6D], y_mask bool
    [B, L] -> [B, T, D]."""
    for n, (B, T, L, D, H, lengths) in enumerate(_PIXART_CASES):
        g = checks.seeded(130 + n)
        block = _fill_(PixArtBlock(D, H), g).eval()
        mask = _padding_mask(lengths, L)
        x, y = torch.randn(B, T, D, generator=g), _text(B, L, D, mask, g)
        t6 = 0.5 * torch.randn(B, 6 * D, generator=g)
        what = f"x {list(x.shape)}, y {list(y.shape)}, t6 {list(t6.shape)}, caption lengths {lengths}"
        try:
            with torch.no_grad():
                got = checks.call_watching_chunks(
                    PIXART, pixart_block, block, x, y, t6, mask, chunks=6, hint=_CHUNK_HINT
                )
                got = checks.expect_tensor(PIXART, got)
                checks.expect_dtype(PIXART, got, x.dtype)
                checks.expect_shape(PIXART, got, (B, T, D))
                checks.expect_close(
                    PIXART,
                    got,
                    block(x, y, t6, mask),
                    diagnose=lambda got, args=(block, x, y, t6, mask): (
                        _nan_hint(got) or _first_match(got, _pixart_variants(*args))
                    ),
                )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(PIXART)


# --------------------------------------------------------------------------
# Exercise 12.3 (adaln_parameters)
# --------------------------------------------------------------------------

#: (depth N, D): small ones, counted on real modules, and DiT-XL/2's (built on the meta device: no memory).
_PARAMS_CASES = [(2, 8), (3, 12), (28, 1152)]


def adaln_counts(depth: int, D: int) -> tuple[int, int]:
    """The adaLN parameters of ``depth`` blocks of width D, counted on the package's modules: (DiT's adaLN-Zero:
    every ``DiTBlock.adaLN_modulation``; PixArt-α's adaLN-single: the shared ``t_block`` SiLU + Linear(D, 6D), as
    ``CaptionDiT`` builds it, plus every ``PixArtBlock.scale_shift_table``). The DiT block and ``t_block`` are built
    on the meta device (no memory); the PixArt block on the CPU (its random table is slow to draw on meta)."""
    with torch.device("meta"):
        dit = DiTBlock(D, 1)
        t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
    pixart = PixArtBlock(D, 1, mlp_ratio=1.0)
    zero = depth * sum(p.numel() for p in dit.adaLN_modulation.parameters())
    single = sum(p.numel() for p in t_block.parameters()) + depth * pixart.scale_shift_table.numel()
    return zero, single


def check_adaln_parameters(adaln_parameters: Callable) -> None:
    """Exercise 12.3: ``adaln_parameters(depth, D)`` -> (adaLN-Zero parameters, adaLN-single parameters) of the
    modulation of ``depth`` blocks of width D (the final layer and the timestep MLP not included), as ints."""
    for depth, D in _PARAMS_CASES:
        what = f"depth={depth}, D={D}"
        zero, single = adaln_counts(depth, D)
        got = checks.call(PARAMS, adaln_parameters, depth, D)
        if not isinstance(got, tuple) or len(got) != 2:
            checks.fail(PARAMS, f"return a tuple of two numbers (adaLN-Zero, adaLN-single), got {got!r} [{what}]")
        for name, value, expected in (("adaLN-Zero", got[0], zero), ("adaLN-single", got[1], single)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                checks.fail(
                    PARAMS,
                    f"the {name} count should be a Python int, got {type(value).__name__} {value!r} (parameters "
                    f"are whole numbers: use integer arithmetic, // not /). [{what}]",
                )
            if value != expected:
                hint = _params_hint(name, value, depth, D)
                message = f"{name}: {value:,} is not what the reference modules hold ({value / expected:.4g} times it)."
                checks.fail(PARAMS, message + (f" {hint}" if hint else "") + f" [{what}]")
    checks.passed(PARAMS)


def _params_hint(name: str, value: int, depth: int, D: int) -> str | None:
    per_block = 6 * D * D + 6 * D
    known = {
        "adaLN-Zero": {
            depth * 6 * D * D: "the biases are missing: Linear(D, 6D) has 6D·D weights AND 6D biases.",
            per_block: "that is ONE block's regressor: DiT has one per block, times depth.",
            depth * (6 * D * D + D): "Linear(D, 6D) has 6D biases, one per output, not D.",
            depth * (4 * D * D + 4 * D): "DiT's blocks regress SIX vectors (shift, scale, gate for attention and MLP).",
            depth * 6 * D: "that is adaLN-single's tables; adaLN-Zero has a Linear(D, 6D) per block.",
            (depth + 1) * per_block: "the final layer is not counted here (only the blocks' modulation).",
        },
        "adaLN-single": {
            6 * D * D + depth * 6 * D: "the shared Linear's 6D biases are missing.",
            depth * 6 * D: "the shared t_block = SiLU, Linear(D, 6D) is missing: it is counted once.",
            per_block: "each block also has its own table E⁽ⁱ⁾ of 6·D learned numbers (scale_shift_table).",
            depth * per_block + depth * 6 * D: "t_block is shared: ONE Linear(D, 6D) for the whole model, not one "
            "per block.",
            depth * per_block: "that is adaLN-Zero's count: adaLN-single has one shared Linear(D, 6D) and a 6 x D "
            "table per block.",
            per_block + depth * 6 * D * D: "each block's table is 6 x D numbers, not 6D x D.",
        },
    }
    return known[name].get(value)


# --------------------------------------------------------------------------
# Exercise 12.4 (mmdit_block)
# --------------------------------------------------------------------------

#: (B, T image tokens, L text tokens, D, H, lengths); T != L, so a split at the wrong place shows.
_MMDIT_CASES = [(2, 6, 4, 16, 4, [4, 2]), (3, 4, 5, 12, 3, [1, 5, 3])]


def _mmdit(
    block: MMDiTBlock, x, c, vec, mask,
    joint: str = "joint", shared: bool = False, text_update: bool = True, use_mask: str = "right",
    split: str = "right", swap_mod: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The MMDiT block, right (the defaults) or with one of the usual slips, on ``block``'s weights."""
    (B, T, D), L = x.shape, c.shape[1]
    cs, xs = block.context_block, block.x_block
    if shared:
        cs = xs
    mc, mx = (s.adaLN_modulation(vec).chunk(6, dim=1) for s in (cs, xs))
    if swap_mod:
        mc, mx = mx, mc
    qc, kc, vc = cs.qkv(c, mc[0], mc[1])
    qx, kx, vx = xs.qkv(x, mx[0], mx[1])
    if use_mask == "right":
        key_mask = torch.cat([mask, mask.new_ones(B, T)], dim=1)
    elif use_mask == "none":
        key_mask = None
    else:  # "image masked": the extension with zeros
        key_mask = torch.cat([mask, mask.new_zeros(B, T)], dim=1)
    if joint == "joint":
        q, k, v = torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)
        out = masked_attention(q, k, v, key_mask).transpose(1, 2).reshape(B, L + T, D)
        if split == "right":
            ac, ax = out.split([L, T], dim=1)
        else:  # image rows taken from the front
            ax, ac = out.split([T, L], dim=1)
    elif joint == "separate":  # two self-attentions
        ac = masked_attention(qc, kc, vc, mask if use_mask == "right" else None).transpose(1, 2).reshape(B, L, D)
        ax = masked_attention(qx, kx, vx).transpose(1, 2).reshape(B, T, D)
    else:  # "one-way": the image reads [c; x], the text only itself
        k, v = torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)
        ax = masked_attention(qx, k, v, key_mask).transpose(1, 2).reshape(B, T, D)
        ac = masked_attention(qc, kc, vc, mask).transpose(1, 2).reshape(B, L, D)
    outs = []
    for s, h, m, a in ((cs, c, mc, ac), (xs, x, mx, ax)):
        h = h + m[2][:, None] * s.attn.proj(a)
        outs.append(h + m[5][:, None] * s.mlp(modulate(s.norm2(h), m[3], m[4])))
    c_out, x_out = outs
    return x_out, (c_out if text_update else c)


def _mmdit_variants(block, x, c, vec, mask) -> list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]]:
    args = (block, x, c, vec, mask)
    return [
        (
            "that is two separate self-attentions, one per stream. MMDiT's attention is JOINT: concatenate the "
            "q, k, v of the text and image tokens along the token axis, [text; image], attend once, split back.",
            lambda: _mmdit(*args, joint="separate"),
        ),
        (
            "only the image tokens read the joint sequence; the text tokens must attend over [text; image] too "
            "(one attention over all L + T tokens, queries included).",
            lambda: _mmdit(*args, joint="one-way"),
        ),
        (
            "the text tokens come back unchanged: in MMDiT the text stream is updated too (its own proj, gate and "
            "MLP on its L rows of the joint attention). Return (x, c) both updated.",
            lambda: _mmdit(*args, text_update=False),
        ),
        (
            "both streams use the image stream's weights: each modality has its own adaLN_modulation, qkv, proj "
            "and MLP (block.context_block for the text, block.x_block for the image).",
            lambda: _mmdit(*args, shared=True),
        ),
        (
            "the modulations are swapped: the text stream is modulated by context_block.adaLN_modulation(vec), "
            "the image stream by x_block's.",
            lambda: _mmdit(*args, swap_mod=True),
        ),
        (
            "the padded text tokens are attended: extend the caption mask to the joint sequence, [mask, all True "
            "for the T image tokens], as a key mask [B, L + T].",
            lambda: _mmdit(*args, use_mask="none"),
        ),
        (
            "your key mask hides the image tokens: the joint mask is [caption mask, True for every image token].",
            lambda: _mmdit(*args, use_mask="image masked"),
        ),
        (
            "the joint output is split at the wrong place: the sequence is [text; image], so its first L rows are "
            "the text's and the last T rows the image's.",
            lambda: _mmdit(*args, split="swapped"),
        ),
    ]


def check_mmdit_block(mmdit_block: Callable) -> None:
    """Exercise 12.4: ``mmdit_block(block, x, c, vec, mask)`` -> (x, c) equals ``block(x, c, vec, mask)`` for a
    ``minidit.captions.MMDiTBlock`` with seeded weights. x [B, T, D] image tokens, c [B, L, D] text tokens, vec
    [B, D], mask bool [B, L] -> (x [B, T, D], c [B, L, D])."""
    for n, (B, T, L, D, H, lengths) in enumerate(_MMDIT_CASES):
        g = checks.seeded(140 + n)
        block = _fill_(MMDiTBlock(D, H), g).eval()
        mask = _padding_mask(lengths, L)
        x, c = torch.randn(B, T, D, generator=g), _text(B, L, D, mask, g)
        vec = torch.randn(B, D, generator=g)
        what = f"x {list(x.shape)}, c {list(c.shape)}, caption lengths {lengths}, num_heads={H}"
        try:
            with torch.no_grad():
                got = checks.call_watching_chunks(
                    MMDIT, mmdit_block, block, x, c, vec, mask, chunks=6, hint=_CHUNK_HINT
                )
                if not isinstance(got, tuple) or len(got) != 2:
                    checks.fail(MMDIT, f"return a tuple (x, c): the image tokens and the text tokens, got "
                                f"{type(got).__name__}.")  # fmt: skip
                gx, gc = (checks.expect_tensor(MMDIT, t, name) for t, name in zip(got, ("x", "c")))
                if tuple(gx.shape) == (B, L, D) and tuple(gc.shape) == (B, T, D):
                    checks.fail(MMDIT, "you returned (c, x); return the image tokens first: (x, c), as the block does.")
                ex, ec = block(x, c, vec, mask)
                variants = _mmdit_variants(block, x, c, vec, mask)
                for got_t, exp_t, i, name in ((gx, ex, 0, "image tokens x"), (gc, ec, 1, "text tokens c")):
                    checks.expect_dtype(MMDIT, got_t, x.dtype)
                    checks.expect_close(
                        MMDIT,
                        got_t,
                        exp_t,
                        what=name,
                        diagnose=lambda got, i=i, variants=variants: (
                            _nan_hint(got)
                            or _first_match(got, [(h, lambda make=make, i=i: make()[i]) for h, make in variants])
                        ),
                    )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(MMDIT)


# --------------------------------------------------------------------------
# Exercise 12.5 (patchify_spacetime)
# --------------------------------------------------------------------------

#: (B, C, F, H, W, pt, p): pt != p and H != W somewhere, so that every swapped axis shows.
_SPACETIME_CASES = [(2, 3, 8, 16, 16, 2, 4), (1, 2, 6, 8, 12, 3, 2), (2, 3, 4, 4, 8, 1, 4)]

_TOKEN_AXES = {"f": "time", "h": "row", "w": "column"}
_VALUE_AXES = {"t": "frame", "p": "patch row", "q": "patch column", "c": "channel"}


def _spacetime_variants(x: torch.Tensor, pt: int, p: int) -> list[Variant]:
    variants: list[Variant] = []
    for tokens in itertools.permutations("fhw"):
        for values in itertools.permutations("tpqc"):
            if tokens == tuple("fhw") and values == tuple("tpqc"):
                continue
            pattern = f"b c (f t) (h p) (w q) -> b ({' '.join(tokens)}) ({' '.join(values)})"
            said = []
            if tokens != tuple("fhw"):
                said.append(
                    f"your tokens are ordered ({', '.join(_TOKEN_AXES[a] for a in tokens)}); the reference's are "
                    "time-major: (time, row, column), all the tubelets of the first pt frames row by row, then the "
                    "next pt frames"
                )
            if values != tuple("tpqc"):
                said.append(
                    f"inside a token your values are laid out ({', '.join(_VALUE_AXES[a] for a in values)}); the "
                    "reference's are (frame, patch row, patch column, channel): channels LAST, as embed.patchify"
                )
            variants.append(("; ".join(said) + ".", lambda pattern=pattern: rearrange(x, pattern, t=pt, p=p, q=p)))
    B = x.shape[0]
    variants.append(
        (
            "a reshape alone does not cut tubelets: the values of one tubelet are not contiguous in [B, C, F, H, W]. "
            "Split F, H, W into (F/pt, pt), (H/p, p), (W/p, p), permute, then flatten.",
            lambda: x.reshape(B, -1, x.shape[1] * pt * p * p),
        )
    )
    return variants


def check_patchify_spacetime(patchify_spacetime: Callable) -> None:
    """Exercise 12.5: ``patchify_spacetime(x, pt, p)`` equals ``minidit.video.patchify_spacetime``.
    x [B, C, F, H, W] -> [B, (F/pt)(H/p)(W/p), pt·p·p·C]."""
    for n, (B, C, Fr, H, W, pt, p) in enumerate(_SPACETIME_CASES):
        g = checks.seeded(150 + n)
        x = torch.randn(B, C, Fr, H, W, generator=g)
        original = x.clone()
        what = f"x {list(x.shape)}, pt={pt}, p={p}"
        try:
            got = checks.expect_tensor(SPACETIME, checks.call(SPACETIME, patchify_spacetime, x, pt, p))
            if not torch.equal(x, original):
                checks.fail(SPACETIME, "your function changed its input x in place; build the tokens from a view.")
            checks.expect_dtype(SPACETIME, got, x.dtype, "Keep the video's dtype.")
            T, Dp = (Fr // pt) * (H // p) * (W // p), pt * p * p * C
            hints = {
                (B, Fr * (H // p) * (W // p), p * p * C): f"one token per FRAME's patch: a tubelet spans pt = {pt} "
                "frames, so T = (F/pt)(H/p)(W/p) and each token holds pt·p·p·C values.",
                (B, Dp, T): "tokens and values are transposed: [B, T, pt·p·p·C].",
                (B, C, T, pt * p * p): "the channels must end up inside each token: [B, T, pt·p·p·C].",
            }
            if (B, T, Dp) in hints:
                del hints[(B, T, Dp)]
            checks.expect_shape(SPACETIME, got, (B, T, Dp), hints)
            checks.expect_close(
                SPACETIME,
                got,
                reference_patchify_spacetime(x, pt, p),
                atol=0,
                rtol=0,
                diagnose=lambda got, x=x, pt=pt, p=p: _first_match(got, _spacetime_variants(x, pt, p)),
            )
        except ExerciseFailed as err:
            raise _with_input(err, what) from None
    checks.passed(SPACETIME)
