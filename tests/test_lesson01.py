"""The checks of lesson 01 are real: right answers pass with one line, stubs fail, and the usual
mistakes are each rejected with the hint that names them.

The right answers and the mistakes are written here by hand (reshape/permute, einops, loops), not
taken from minidit, so a check that compared minidit with itself would not pass these tests.
"""

import math

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import nn

from minidit.course import lesson01
from minidit.course.checks import ExerciseFailed

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise N.M (name): replace this line with your code")


def assert_passes(check, fn, label, capsys):
    check(fn)
    assert capsys.readouterr().out == f"✅ Exercise {label} passed\n"


def assert_fails(check, fn, label, *hints):
    with pytest.raises(ExerciseFailed) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith(f"Exercise {label}:"), message
    for hint in hints:
        assert hint in message, f"expected {hint!r} in:\n{message}"
    return message


# --------------------------------------------------------------------------
# 1.1 (patchify) and 1.2 (patchify_einops)
# --------------------------------------------------------------------------


def patchify_right(x, p):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, q, C]
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def patchify_by_loops(x, p):
    B, C, H, W = x.shape
    h, w = H // p, W // p
    out = torch.empty(B, h * w, p * p * C)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for c in range(C):
                        out[:, i * w + j, (a * p + b) * C + c] = x[:, c, i * p + a, j * p + b]
    return out


def patchify_einops_right(x, p):
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def patchify_channels_first(x, p):
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)


def patchify_column_major(x, p):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1)  # [B, w, h, p, q, C]
    return x.reshape(B, -1, p * p * C)


def patchify_interleaved(x, p):  # split H as (p, H/p): strided "patches"
    B, C, H, W = x.shape
    x = x.reshape(B, C, p, H // p, p, W // p).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(B, -1, p * p * C)


def patchify_grid_for_patch(x, p):  # uses the grid size where the patch size belongs
    B, C, H, W = x.shape
    x = x.reshape(B, C, p, H // p, p, W // p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, p * p, -1)


def patchify_features_first(x, p):
    return patchify_right(x, p).transpose(1, 2)


def patchify_transposed_image(x, p):
    return rearrange(x, "b c (h p) (w q) -> b (w h) (q p c)", p=p, q=p)


def patchify_square_only(x, p):  # uses H for the width as well
    B, C, H, _ = x.shape
    x = x.reshape(B, C, H // p, p, H // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, -1, p * p * C)


def patchify_no_permute(x, p):  # the shape is right, the values are rows of pixels
    B, C, H, W = x.shape
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def patchify_unfold(x, p):  # F.unfold's layout is (c, p, q): channels first
    return torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)


def test_by_loops_is_the_reference_order():
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(patchify_by_loops(x, 2), patchify_right(x, 2))


@pytest.mark.parametrize(
    "check, label",
    [(lesson01.check_patchify, "1.1 (patchify)"), (lesson01.check_patchify_einops, "1.2 (patchify_einops)")],
)
def test_patchify_checks(check, label, capsys):
    for right in (patchify_right, patchify_einops_right, patchify_by_loops):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    assert_fails(check, patchify_channels_first, label, "channels first", "channels LAST")
    assert_fails(check, patchify_unfold, label, "channels first")
    assert_fails(check, patchify_column_major, label, "column by column", "row-major")
    assert_fails(check, patchify_interleaved, label, "pixels H/p apart", "(h p)")
    assert_fails(check, patchify_grid_for_patch, label, "got shape (2, 4, 48)", "swap the patch size and the grid size")
    assert_fails(check, patchify_features_first, label, "expected (2, 16, 12)", "Tokens and features are swapped")
    assert_fails(check, patchify_transposed_image, label, "TRANSPOSED image")
    message = assert_fails(check, patchify_square_only, label, "Square inputs passed", "x of shape (1, 4, 12, 8)")
    assert "raised RuntimeError" in message
    assert_fails(check, lambda x, p: x.flatten(2), label, "got shape")
    assert_fails(check, patchify_no_permute, label, "without permuting")
    assert_fails(check, lambda x, p: patchify_right(x, p).numpy(), label, "should be a torch.Tensor")


# --------------------------------------------------------------------------
# 1.3 (unpatchify)
# --------------------------------------------------------------------------


def unpatchify_right(x, p, c):
    B, T, _ = x.shape
    h = w = math.isqrt(T)
    x = x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, c, h, p, w, q]
    return x.reshape(B, c, h * p, w * p)


def unpatchify_by_loops(x, p, c):
    B, T, _ = x.shape
    h = w = math.isqrt(T)
    out = torch.empty(B, c, h * p, w * p)
    for t in range(T):
        i, j = divmod(t, w)
        for a in range(p):
            for b in range(p):
                for k in range(c):
                    out[:, k, i * p + a, j * p + b] = x[:, t, (a * p + b) * c + k]
    return out


def unpatchify_channels_first(x, p, c):
    h = math.isqrt(x.shape[1])
    return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=h, p=p, q=p, c=c)


def unpatchify_transposed(x, p, c):  # permute(0, 5, 2, 4, 1, 3): rows and columns swapped
    B, T, _ = x.shape
    h = math.isqrt(T)
    return x.reshape(B, h, h, p, p, c).permute(0, 5, 2, 4, 1, 3).reshape(B, c, h * p, h * p)


def unpatchify_p_before_h(x, p, c):  # permute to [B, c, p, h, q, w]
    B, T, _ = x.shape
    h = math.isqrt(T)
    return x.reshape(B, h, h, p, p, c).permute(0, 5, 3, 1, 4, 2).reshape(B, c, h * p, h * p)


def unpatchify_no_permute(x, p, c):  # the shape is right, the pixels are scrambled
    B, T, _ = x.shape
    h = math.isqrt(T)
    return x.reshape(B, c, h * p, h * p)


def unpatchify_channels_last_image(x, p, c):
    return unpatchify_right(x, p, c).permute(0, 2, 3, 1)


def unpatchify_patch_transposed(x, p, c):
    h = math.isqrt(x.shape[1])
    return rearrange(x, "b (h w) (q p c) -> b c (h p) (w q)", h=h, p=p, q=p, c=c)


def test_unpatchify_check(capsys):
    label = "1.3 (unpatchify)"
    check = lesson01.check_unpatchify
    for right in (unpatchify_right, unpatchify_by_loops):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    assert_fails(check, unpatchify_channels_first, label, "channels first", "[B, h, w, p, p, c]")
    assert_fails(check, unpatchify_transposed, label, "TRANSPOSED")
    assert_fails(check, unpatchify_p_before_h, label, "(p h) instead of (h p)")
    assert_fails(check, unpatchify_patch_transposed, label, "Each patch comes out transposed")
    assert_fails(check, unpatchify_channels_last_image, label, "channels-last image")
    assert_fails(check, unpatchify_no_permute, label, "without permuting", "[B, h, w, p, p, c]")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify_right(patchify_right(x, 2), 2, 3), x)


# --------------------------------------------------------------------------
# 1.4 (patch_embed_as_linear)
# --------------------------------------------------------------------------


def linear_from(weight, bias):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def embed_right(conv):
    D = conv.out_channels
    return linear_from(conv.weight.permute(0, 2, 3, 1).reshape(D, -1), conv.bias)


def embed_channels_first(conv):  # the Conv2d's own flatten order
    return linear_from(conv.weight.reshape(conv.out_channels, -1), conv.bias)


def embed_patch_transposed(conv):
    return linear_from(conv.weight.permute(0, 3, 2, 1).reshape(conv.out_channels, -1), conv.bias)


def embed_no_bias(conv):
    return linear_from(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), None)


def embed_bias_not_copied(conv):
    D = conv.out_channels
    torch.manual_seed(0)
    lin = nn.Linear(conv.weight[0].numel(), D)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(D, -1))
    return lin


def embed_zero_bias(conv):
    return linear_from(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), torch.zeros(conv.out_channels))


def embed_tensor(conv):
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def embed_transposed_weight(conv):
    lin = nn.Linear(conv.out_channels, conv.weight[0].numel())
    with torch.no_grad():
        lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1).T)
    return lin


def embed_in_place(conv):
    with torch.no_grad():
        conv.weight.mul_(1.0 + 1e-3)
    return embed_right(conv)


def test_patch_embed_as_linear_check(capsys):
    label = "1.4 (patch_embed_as_linear)"
    check = lesson01.check_patch_embed_as_linear
    assert_passes(check, embed_right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    assert_fails(check, embed_channels_first, label, "channels first", "permute(0, 2, 3, 1)")
    assert_fails(check, embed_patch_transposed, label, "patch row and column are swapped")
    assert_fails(check, embed_no_bias, label, "has no bias")
    assert_fails(check, embed_bias_not_copied, label, "Did you copy conv.bias?")
    assert_fails(check, embed_zero_bias, label, "bias is all zeros")
    assert_fails(check, embed_tensor, label, "return an nn.Linear, not a tensor")
    assert_fails(check, embed_transposed_weight, label, "[out_features, in_features]")
    assert_fails(check, embed_in_place, label, "modified the Conv2d")


# --------------------------------------------------------------------------
# 1.5 (pos_embed)
# --------------------------------------------------------------------------


def pos_embed_by_loops(D, g, rows_first=False, cos_first=False, denominator=None, start=0, dtype=torch.float64):
    """The table entry by entry; the keyword arguments make the usual mistakes."""
    quarter = D // 4
    denominator = denominator or quarter
    table = torch.zeros(g * g, D, dtype=torch.float64)
    for r in range(g):
        for c in range(g):
            for half, pos in enumerate((r, c) if rows_first else (c, r)):
                for i in range(quarter):
                    angle = (pos + start) / 10000 ** (i / denominator)
                    first, second = (
                        (math.cos(angle), math.sin(angle)) if cos_first else (math.sin(angle), math.cos(angle))
                    )
                    table[r * g + c, half * D // 2 + i] = first
                    table[r * g + c, half * D // 2 + quarter + i] = second
    return table.to(dtype)


def pos_embed_vectorised(D, g):
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")

    def one_d(pos):
        angle = pos.reshape(-1, 1).double() * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1)


def pos_embed_interleaved(D, g):
    table = pos_embed_vectorised(D, g).reshape(g * g, 2, 2, D // 4)  # [T, half, sin/cos, freq]
    return table.transpose(2, 3).reshape(g * g, D)


def test_pos_embed_check(capsys):
    label = "1.5 (pos_embed)"
    check = lesson01.check_pos_embed
    for right in (pos_embed_by_loops, pos_embed_vectorised, lambda D, g: pos_embed_vectorised(D, g).numpy()):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    assert_fails(check, lambda D, g: pos_embed_by_loops(D, g, rows_first=True), label, "The halves are swapped")
    assert_fails(check, lambda D, g: pos_embed_by_loops(D, g, cos_first=True), label, "sines first")
    assert_fails(check, lambda D, g: pos_embed_by_loops(D, g, denominator=D / 2), label, "not by D/2")
    assert_fails(check, lambda D, g: pos_embed_by_loops(D, g, start=1), label, "Positions start at 1")
    assert_fails(check, pos_embed_interleaved, label, "interleaved")
    message = assert_fails(
        check, lambda D, g: pos_embed_by_loops(D, g, rows_first=True, cos_first=True), label, "sines first"
    )
    assert "The halves are swapped" in message
    assert_fails(check, lambda D, g: pos_embed_by_loops(D, g, dtype=torch.float32), label, "float64")
    assert_fails(check, lambda D, g: pos_embed_vectorised(D, g).reshape(g, g, D), label, "row by row: [T, D]")
    assert_fails(check, lambda D, g: pos_embed_vectorised(D, g).T, label, "transposed")
    assert_fails(check, lambda D, g: pos_embed_vectorised(D, g)[None], label, "without a batch axis")


def test_checks_are_deterministic_and_fast(capsys):
    import time

    start = time.perf_counter()
    for check, fn in (
        (lesson01.check_patchify, patchify_right),
        (lesson01.check_unpatchify, unpatchify_right),
        (lesson01.check_patch_embed_as_linear, embed_right),
        (lesson01.check_pos_embed, pos_embed_vectorised),
    ):
        check(fn)
    assert time.perf_counter() - start < 4.0
    first = None
    for _ in range(2):
        with pytest.raises(ExerciseFailed) as info:
            lesson01.check_pos_embed(lambda D, g: np.zeros((g * g, D)))
        first = first or str(info.value)
        assert str(info.value) == first
