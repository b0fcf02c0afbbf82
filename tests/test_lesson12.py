"""Lesson 12's checks are real: the right answers pass (printing exactly the one success line), the stubs fail,
and plausible mistakes are each rejected with a hint that names them."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exercises import assert_fails, assert_passes, stub

from minidit.course import lesson12
from minidit.model import modulate

# --------------------------------------------------------------------------
# 12.1 (cross_attention)
# --------------------------------------------------------------------------


def cross_attention(x, y, y_mask, q_linear, kv_linear, proj, num_heads, mask_with="-inf", kv="2hd", heads=None):
    """The answer, and switches for the usual slips."""
    (B, T, D), L = x.shape, y.shape[1]
    H = heads or num_heads
    d = D // H
    q = q_linear(x).view(B, T, H, d).transpose(1, 2)
    if kv == "2hd":
        k, v = kv_linear(y).view(B, L, 2, H, d).permute(2, 0, 3, 1, 4)
    elif kv == "swapped":
        v, k = kv_linear(y).view(B, L, 2, H, d).permute(2, 0, 3, 1, 4)
    else:  # (H, 2, d)
        k, v = kv_linear(y).view(B, L, H, 2, d).permute(3, 0, 2, 1, 4)
    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    keep = y_mask[:, None, None, :]
    if mask_with == "-inf":
        a = s.masked_fill(~keep, float("-inf")).softmax(-1)
    elif mask_with == "nothing":
        a = s.softmax(-1)
    elif mask_with == "inverted":
        a = s.masked_fill(keep, float("-inf")).softmax(-1)
    elif mask_with == "after softmax":
        a = s.softmax(-1) * keep
    elif mask_with == "+mask":
        a = (s + keep.float()).softmax(-1)
    elif mask_with == "-1e4 on wrong side":  # a big negative number on the real tokens
        a = s.masked_fill(keep, -1e4).softmax(-1)
    return proj((a @ v).transpose(1, 2).reshape(B, T, D))


def cross_attention_sdpa(x, y, y_mask, q_linear, kv_linear, proj, num_heads):
    (B, T, _), L, H = x.shape, y.shape[1], num_heads
    q = q_linear(x).reshape(B, T, H, -1).transpose(1, 2)
    k, v = kv_linear(y).reshape(B, L, 2, H, -1).unbind(2)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=y_mask[:, None, None])
    return proj(out.transpose(1, 2).flatten(2))


def cross_queries_from_text(x, y, y_mask, q_linear, kv_linear, proj, num_heads):
    return cross_attention(y, x, torch.ones(x.shape[:2], dtype=torch.bool), q_linear, kv_linear, proj, num_heads)


CROSS_MUTANTS = [
    ("mask ignored", lambda *a: cross_attention(*a, mask_with="nothing"), ("the padded text tokens are attended",)),
    ("mask inverted", lambda *a: cross_attention(*a, mask_with="inverted"), ("NaN", "invert the mask")),
    ("mask inverted, -1e4", lambda *a: cross_attention(*a, mask_with="-1e4 on wrong side"),
     ("you masked the REAL tokens",)),
    ("mask after the softmax", lambda *a: cross_attention(*a, mask_with="after softmax"), ("AFTER the softmax",)),
    ("boolean mask added", lambda *a: cross_attention(*a, mask_with="+mask"), ("you added the boolean mask",)),
    ("k and v swapped", lambda *a: cross_attention(*a, kv="swapped"), ("keys and values are swapped",)),
    ("kv laid out (H, 2, d)", lambda *a: cross_attention(*a, kv="h2d"), ("laid out (2, H, d)",)),
    ("queries from the text", cross_queries_from_text, ("one output row per IMAGE token",)),
    ("float64 result", lambda *a: cross_attention(*a).double(), ("expected torch.float32",)),
    ("numpy result", lambda *a: cross_attention(*a).numpy(), ("should be a torch.Tensor",)),
]  # fmt: skip


@pytest.mark.parametrize("fn", [cross_attention, cross_attention_sdpa])
def test_cross_attention_passes(fn, capsys):
    assert_passes(lesson12.check_cross_attention, fn, "12.1 (cross_attention)", capsys)


@pytest.mark.parametrize("name, fn, hints", CROSS_MUTANTS, ids=[m[0] for m in CROSS_MUTANTS])
def test_cross_attention_rejects(name, fn, hints):
    assert_fails(lesson12.check_cross_attention, fn, "12.1 (cross_attention)", *hints)


def test_cross_attention_stub_fails():
    assert_fails(lesson12.check_cross_attention, stub, "12.1 (cross_attention)", "not implemented yet")


# --------------------------------------------------------------------------
# 12.2 (pixart_block)
# --------------------------------------------------------------------------


def pixart_block(block, x, y, t6, y_mask, slip=None):
    B, T, D = x.shape
    six = block.scale_shift_table[None] + t6.view(B, 6, D)
    if slip == "no table":
        six = t6.view(B, 6, D)
    if slip == "chunk without dim":
        six = (block.scale_shift_table.flatten()[None] + t6).chunk(6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        six.unbind(1) if slip != "chunk without dim" else six
    )
    if slip == "shift/scale swapped":
        shift_msa, scale_msa, shift_mlp, scale_mlp = scale_msa, shift_msa, scale_mlp, shift_mlp
    x = x + gate_msa[:, None] * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
    if slip == "gated cross-attention":
        x = x + gate_msa[:, None] * block.cross_attn(x, y, y_mask)
    elif slip == "cross-attention on LN(x)":
        x = x + block.cross_attn(block.norm1(x), y, y_mask)
    elif slip == "no mask":
        x = x + block.cross_attn(x, y)
    elif slip not in ("no cross-attention", "cross-attention last"):
        x = x + block.cross_attn(x, y, y_mask)
    x = x + gate_mlp[:, None] * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
    if slip == "cross-attention last":
        x = x + block.cross_attn(x, y, y_mask)
    return x


def pixart_block_flat(block, x, y, t6, y_mask):
    """Also right: the table flattened to [6D] and added to t6, then chunked along the features."""
    m = (block.scale_shift_table.reshape(1, -1) + t6).chunk(6, dim=1)
    x = x + m[2].unsqueeze(1) * block.attn(block.norm1(x) * (1 + m[1].unsqueeze(1)) + m[0].unsqueeze(1))
    x = x + block.cross_attn(x, y, y_mask)
    return x + m[5].unsqueeze(1) * block.mlp(block.norm2(x) * (1 + m[4].unsqueeze(1)) + m[3].unsqueeze(1))


PIXART_MUTANTS = [
    ("table forgotten", "no table", ("scale_shift_table is missing",)),
    ("chunk(6) without dim", "chunk without dim", ("chunk(6) and no dim", "BATCH axis")),
    ("shift and scale swapped", "shift/scale swapped", ("shift and scale are swapped",)),
    ("gate on the cross-attention", "gated cross-attention", ("the cross-attention branch has no gate",)),
    ("cross-attention on LN(x)", "cross-attention on LN(x)", ("reads x itself, not LN(x)",)),
    ("mask not passed", "no mask", ("y_mask was not passed",)),
    ("no cross-attention", "no cross-attention", ("the cross-attention branch is missing",)),
    ("cross-attention after the MLP", "cross-attention last", ("yours runs last",)),
]  # fmt: skip


@pytest.mark.parametrize("fn", [pixart_block, pixart_block_flat])
def test_pixart_block_passes(fn, capsys):
    assert_passes(lesson12.check_pixart_block, fn, "12.2 (pixart_block)", capsys)


@pytest.mark.parametrize("name, slip, hints", PIXART_MUTANTS, ids=[m[0] for m in PIXART_MUTANTS])
def test_pixart_block_rejects(name, slip, hints):
    fn = lambda *a: pixart_block(*a, slip=slip)  # noqa: E731
    assert_fails(lesson12.check_pixart_block, fn, "12.2 (pixart_block)", *hints)


def test_pixart_block_stub_fails():
    assert_fails(lesson12.check_pixart_block, stub, "12.2 (pixart_block)", "not implemented yet")


# --------------------------------------------------------------------------
# 12.3 (adaln_parameters)
# --------------------------------------------------------------------------


def adaln_parameters(depth, D):
    per_block = D * 6 * D + 6 * D
    return depth * per_block, per_block + depth * 6 * D


PARAMS_MUTANTS = [
    ("no biases", lambda n, D: (n * 6 * D * D, 6 * D * D + n * 6 * D), ("the biases are missing",)),
    ("one block only", lambda n, D: (6 * D * D + 6 * D, adaln_parameters(n, D)[1]), ("that is ONE block's",)),
    ("t_block per block", lambda n, D: (adaln_parameters(n, D)[0], n * (6 * D * D + 6 * D) + n * 6 * D),
     ("t_block is shared",)),
    ("tables forgotten", lambda n, D: (adaln_parameters(n, D)[0], 6 * D * D + 6 * D), ("its own table",)),
    ("t_block forgotten", lambda n, D: (adaln_parameters(n, D)[0], n * 6 * D),
     ("t_block = SiLU, Linear(D, 6D) is missing",)),
    ("four vectors", lambda n, D: (n * (4 * D * D + 4 * D), adaln_parameters(n, D)[1]), ("SIX vectors",)),
    ("final layer counted", lambda n, D: ((n + 1) * (6 * D * D + 6 * D), adaln_parameters(n, D)[1]),
     ("the final layer is not counted",)),
    ("floats", lambda n, D: tuple(float(v) for v in adaln_parameters(n, D)), ("should be a Python int",)),
    ("tensors", lambda n, D: tuple(torch.tensor(v) for v in adaln_parameters(n, D)), ("should be a Python int",)),
    ("one number", lambda n, D: adaln_parameters(n, D)[0] - adaln_parameters(n, D)[1], ("return a tuple of two",)),
    ("pair swapped", lambda n, D: adaln_parameters(n, D)[::-1], ("adaLN-Zero:", "times it")),
]  # fmt: skip


def test_adaln_parameters_passes(capsys):
    assert_passes(lesson12.check_adaln_parameters, adaln_parameters, "12.3 (adaln_parameters)", capsys)
    np_ints = lambda n, D: tuple(np.int64(v) for v in adaln_parameters(n, D))  # noqa: E731
    assert_passes(lesson12.check_adaln_parameters, np_ints, "12.3 (adaln_parameters)", capsys)


@pytest.mark.parametrize("name, fn, hints", PARAMS_MUTANTS, ids=[m[0] for m in PARAMS_MUTANTS])
def test_adaln_parameters_rejects(name, fn, hints):
    assert_fails(lesson12.check_adaln_parameters, fn, "12.3 (adaln_parameters)", *hints)


def test_adaln_parameters_stub_fails_and_counts_are_measured():
    assert_fails(lesson12.check_adaln_parameters, stub, "12.3 (adaln_parameters)", "not implemented yet")
    # the expected counts come from the package's modules, and match PixArt-α's arithmetic for DiT-XL/2
    assert lesson12.adaln_counts(28, 1152) == (28 * (6 * 1152**2 + 6 * 1152), 6 * 1152**2 + 6 * 1152 + 28 * 6 * 1152)


# --------------------------------------------------------------------------
# 12.4 (mmdit_block)
# --------------------------------------------------------------------------


def mmdit_block(block, x, c, vec, mask, slip=None):
    (B, T, D), L = x.shape, c.shape[1]
    streams = (block.context_block, block.x_block)
    if slip == "shared weights":
        streams = (block.x_block, block.x_block)
    mods = [s.adaLN_modulation(vec).chunk(6, dim=1) for s in streams]
    if slip == "chunk without dim":
        mods = [s.adaLN_modulation(vec).chunk(6) for s in streams]
    (qc, kc, vc), (qx, kx, vx) = (s.qkv(h, m[0], m[1]) for s, h, m in zip(streams, (c, x), mods))
    key = torch.cat([mask, mask.new_ones(B, T)], dim=1)[:, None, None]
    if slip == "no mask":
        key = None
    q, k, v = torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)
    if slip == "image first":  # also right: the order does not matter if the mask and the split follow it
        q, k, v = torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2)
        key = torch.cat([mask.new_ones(B, T), mask], dim=1)[:, None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key).transpose(1, 2).reshape(B, L + T, D)
    ac, ax = out[:, :L], out[:, L:]
    if slip == "image first":
        ax, ac = out[:, :T], out[:, T:]
    if slip == "split swapped":
        ax, ac = out[:, :T], out[:, T:]
    if slip == "separate":
        ac = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask[:, None, None]).transpose(1, 2).reshape(B, L, D)
        ax = F.scaled_dot_product_attention(qx, kx, vx).transpose(1, 2).reshape(B, T, D)
    res = []
    for s, h, m, a in zip(streams, (c, x), mods, (ac, ax)):
        h = h + m[2][:, None] * s.attn.proj(a)
        res.append(h + m[5][:, None] * s.mlp(modulate(s.norm2(h), m[3], m[4])))
    if slip == "text not updated":
        return res[1], c
    if slip == "returns (c, x)":
        return res[0], res[1]
    if slip == "list":
        return [res[1], res[0]]
    return res[1], res[0]


MMDIT_MUTANTS = [
    ("two self-attentions", "separate", ("two separate self-attentions",)),
    ("text stream not updated", "text not updated", ("the text tokens come back unchanged",)),
    ("one set of weights", "shared weights", ("both streams use the image stream's weights",)),
    ("padding attended", "no mask", ("extend the caption mask",)),
    ("split at the wrong place", "split swapped", ("split at the wrong place",)),
    ("returns (c, x)", "returns (c, x)", ("you returned (c, x)",)),
    ("a list", "list", ("return a tuple (x, c)",)),
    ("chunk(6) without dim", "chunk without dim", ("chunk(6) and no dim",)),
]  # fmt: skip


@pytest.mark.parametrize("slip", [None, "image first"])
def test_mmdit_block_passes(slip, capsys):
    assert_passes(lesson12.check_mmdit_block, lambda *a: mmdit_block(*a, slip=slip), "12.4 (mmdit_block)", capsys)


@pytest.mark.parametrize("name, slip, hints", MMDIT_MUTANTS, ids=[m[0] for m in MMDIT_MUTANTS])
def test_mmdit_block_rejects(name, slip, hints):
    fn = lambda *a: mmdit_block(*a, slip=slip)  # noqa: E731
    assert_fails(lesson12.check_mmdit_block, fn, "12.4 (mmdit_block)", *hints)


def test_mmdit_block_stub_fails():
    assert_fails(lesson12.check_mmdit_block, stub, "12.4 (mmdit_block)", "not implemented yet")


# --------------------------------------------------------------------------
# 12.5 (patchify_spacetime)
# --------------------------------------------------------------------------


def patchify_spacetime(x, pt, p, order=(0, 2, 4, 6, 3, 5, 7, 1)):
    B, C, F_, H, W = x.shape
    x = x.reshape(B, C, F_ // pt, pt, H // p, p, W // p, p).permute(*order)
    return x.reshape(B, (F_ // pt) * (H // p) * (W // p), -1)


def per_frame_patches(x, pt, p):  # ignores pt: a 2-D patchify of every frame
    B, C, F_, H, W = x.shape
    x = x.reshape(B, C, F_, H // p, p, W // p, p).permute(0, 2, 3, 5, 4, 6, 1)
    return x.reshape(B, F_ * (H // p) * (W // p), p * p * C)


SPACETIME_MUTANTS = [
    ("channels first in a token", lambda x, pt, p: patchify_spacetime(x, pt, p, (0, 2, 4, 6, 1, 3, 5, 7)),
     ("(channel, frame, patch row, patch column)", "channels LAST")),
    ("space-major tokens", lambda x, pt, p: patchify_spacetime(x, pt, p, (0, 4, 6, 2, 3, 5, 7, 1)),
     ("your tokens are ordered (row, column, time)", "time-major")),
    ("columns before rows", lambda x, pt, p: patchify_spacetime(x, pt, p, (0, 2, 6, 4, 3, 5, 7, 1)),
     ("your tokens are ordered (time, column, row)",)),
    ("frame last in a token", lambda x, pt, p: patchify_spacetime(x, pt, p, (0, 2, 4, 6, 5, 7, 3, 1)),
     ("(patch row, patch column, frame, channel)",)),
    ("a reshape alone", lambda x, pt, p: x.reshape(x.shape[0], -1, x.shape[1] * pt * p * p),
     ("a reshape alone does not cut tubelets",)),
    ("per-frame patches", per_frame_patches, ("a tubelet spans pt = 2 frames",)),
    ("numpy result", lambda x, pt, p: patchify_spacetime(x, pt, p).numpy(), ("should be a torch.Tensor",)),
    ("float64 result", lambda x, pt, p: patchify_spacetime(x, pt, p).double(), ("expected torch.float32",)),
]  # fmt: skip


def test_patchify_spacetime_passes(capsys):
    assert_passes(lesson12.check_patchify_spacetime, patchify_spacetime, "12.5 (patchify_spacetime)", capsys)


@pytest.mark.parametrize("name, fn, hints", SPACETIME_MUTANTS, ids=[m[0] for m in SPACETIME_MUTANTS])
def test_patchify_spacetime_rejects(name, fn, hints):
    assert_fails(lesson12.check_patchify_spacetime, fn, "12.5 (patchify_spacetime)", *hints)


def test_patchify_spacetime_stub_fails():
    assert_fails(lesson12.check_patchify_spacetime, stub, "12.5 (patchify_spacetime)", "not implemented yet")
