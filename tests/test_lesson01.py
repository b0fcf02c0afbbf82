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
from exercises import assert_fails, assert_passes, stub
from torch import nn

from minidit.course import lesson01
from minidit.course.checks import ExerciseFailed

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


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
    out = torch.empty(B, h * w, p * p * C, dtype=x.dtype)
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


def patchify_float32(x, p):  # an almost-right answer: right values, but float64 comes back float32
    return patchify_right(x, p).float()


def patchify_loops_float32(x, p):  # torch.empty without dtype= is float32 whatever x is
    out = patchify_by_loops(x, p)
    return out.to(torch.float32)


PATCHIFY_MUTANTS = [  # (mistake, function, hint keywords)
    ("channels first (c p q)", patchify_channels_first, ("channels first", "channels LAST")),
    ("F.unfold's layout", patchify_unfold, ("channels first",)),
    ("tokens column by column", patchify_column_major, ("column by column", "row-major")),
    ("(p h) instead of (h p)", patchify_interleaved, ("pixels H/p apart", "(h p)")),
    ("grid size and patch size swapped", patchify_grid_for_patch,
     ("got shape (2, 4, 48)", "swap the patch size and the grid size")),
    ("tokens and features swapped", patchify_features_first,
     ("expected (2, 16, 12)", "Tokens and features are swapped")),
    ("transposed image", patchify_transposed_image, ("TRANSPOSED image",)),
    ("H used for W (square only)", patchify_square_only, ("Square inputs passed", "x of shape (1, 4, 12, 8)")),
    ("flatten(2) only", lambda x, p: x.flatten(2), ("got shape",)),
    ("reshape without permute", patchify_no_permute, ("without permuting",)),
    ("numpy array returned", lambda x, p: patchify_right(x, p).numpy(), ("should be a torch.Tensor",)),
    ("float64 input returned as float32", patchify_float32, ("expected torch.float64", "keep the input's dtype")),
    ("loops into a float32 buffer", patchify_loops_float32, ("expected torch.float64",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "check, label",
    [(lesson01.check_patchify, "1.1 (patchify)"), (lesson01.check_patchify_einops, "1.2 (patchify_einops)")],
)
def test_patchify_checks(check, label, capsys):
    for right in (patchify_right, patchify_einops_right, patchify_by_loops):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    for _, fn, hints in PATCHIFY_MUTANTS:
        assert_fails(check, fn, label, *hints)
    assert "raised RuntimeError" in assert_fails(check, patchify_square_only, label)


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
    out = torch.empty(B, c, h * p, w * p, dtype=x.dtype)
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


UNPATCHIFY_MUTANTS = [
    ("reads tokens channels first", unpatchify_channels_first, ("channels first", "[B, h, w, p, p, c]")),
    ("transposed image", unpatchify_transposed, ("TRANSPOSED",)),
    ("(p h) instead of (h p)", unpatchify_p_before_h, ("(p h) instead of (h p)",)),
    ("each patch transposed", unpatchify_patch_transposed, ("Each patch comes out transposed",)),
    ("channels-last image", unpatchify_channels_last_image, ("channels-last image",)),
    ("reshape without permute", unpatchify_no_permute, ("without permuting", "[B, h, w, p, p, c]")),
    ("numpy array returned", lambda x, p, c: unpatchify_right(x, p, c).numpy(), ("should be a torch.Tensor",)),
    ("float64 input returned as float32", lambda x, p, c: unpatchify_right(x, p, c).float(),
     ("expected torch.float64", "keep the input's dtype")),
]  # fmt: skip


def test_unpatchify_check(capsys):
    label = "1.3 (unpatchify)"
    check = lesson01.check_unpatchify
    for right in (unpatchify_right, unpatchify_by_loops):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    for _, fn, hints in UNPATCHIFY_MUTANTS:
        assert_fails(check, fn, label, *hints)
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


def embed_float32(conv):  # the learner's almost-right answer: nn.Linear's default dtype whatever the conv's
    D = conv.out_channels
    lin = nn.Linear(conv.weight[0].numel(), D)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(D, -1))
        lin.bias.copy_(conv.bias)
    return lin


def embed_right_dtype(conv):
    D, C, p, _ = conv.weight.shape
    lin = nn.Linear(p * p * C, D, dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(D, -1))
        lin.bias.copy_(conv.bias)
    return lin


EMBED_MUTANTS = [
    ("conv weight flattened channels first", embed_channels_first, ("channels first", "behind the two patch axes")),
    ("each patch transposed", embed_patch_transposed, ("patch row and column are swapped",)),
    ("no bias", embed_no_bias, ("has no bias",)),
    ("bias not copied", embed_bias_not_copied, ("Did you copy conv.bias?",)),
    ("zero bias", embed_zero_bias, ("bias is all zeros",)),
    ("returns the weight tensor", embed_tensor, ("return an nn.Linear, not a tensor",)),
    ("weight [p*p*C, D]", embed_transposed_weight, ("[out_features, in_features]",)),
    ("modifies the conv in place", embed_in_place, ("modified the Conv2d",)),
    ("float32 Linear for a float64 conv", embed_float32, ("torch.float64 but your Linear is torch.float32",
                                                         "Create it with the conv's dtype")),
]  # fmt: skip


def test_patch_embed_as_linear_check(capsys):
    label = "1.4 (patch_embed_as_linear)"
    check = lesson01.check_patch_embed_as_linear
    assert_passes(check, embed_right_dtype, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    for _, fn, hints in EMBED_MUTANTS:
        assert_fails(check, fn, label, *hints)


def test_the_float32_linear_breaks_the_lessons_float64_comparison():
    """Why 1.4 checks the dtype: the lesson's next cell runs the Linear on float64 tokens."""
    conv = nn.Conv2d(4, 8, 2, stride=2, dtype=torch.float64)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        embed_float32(conv)(patchify_right(x, 2))
    torch.testing.assert_close(embed_right_dtype(conv)(patchify_right(x, 2)), conv(x).flatten(2).transpose(1, 2))


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


POS_MUTANTS = [
    ("row half first", lambda D, g: pos_embed_by_loops(D, g, rows_first=True), ("The halves are swapped",)),
    ("cos before sin", lambda D, g: pos_embed_by_loops(D, g, cos_first=True), ("sines first",)),
    ("exponent divided by D/2", lambda D, g: pos_embed_by_loops(D, g, denominator=D / 2), ("not by D/2",)),
    ("exponent divided by D/4 - 1", lambda D, g: pos_embed_by_loops(D, g, denominator=D // 4 - 1),
     ("divides by D/4 - 1", "k = 0 .. D/4-1")),
    ("positions start at 1", lambda D, g: pos_embed_by_loops(D, g, start=1), ("Positions start at 1",)),
    ("sin and cos interleaved", pos_embed_interleaved, ("interleaved",)),
    ("rows first and cos first", lambda D, g: pos_embed_by_loops(D, g, rows_first=True, cos_first=True),
     ("sines first", "The halves are swapped")),
    ("float32 table", lambda D, g: pos_embed_by_loops(D, g, dtype=torch.float32), ("float64",)),
    ("[g, g, D] grid", lambda D, g: pos_embed_vectorised(D, g).reshape(g, g, D), ("row by row: [T, D]",)),
    ("transposed table", lambda D, g: pos_embed_vectorised(D, g).T, ("transposed",)),
    ("batch axis", lambda D, g: pos_embed_vectorised(D, g)[None], ("without a batch axis",)),
    ("numpy array", lambda D, g: pos_embed_vectorised(D, g).numpy(), ("numpy array", "return a torch.Tensor")),
]  # fmt: skip


def test_pos_embed_check(capsys):
    label = "1.5 (pos_embed)"
    check = lesson01.check_pos_embed
    for right in (pos_embed_by_loops, pos_embed_vectorised):
        assert_passes(check, right, label, capsys)
    assert_fails(check, stub, label, "not implemented yet")
    for _, fn, hints in POS_MUTANTS:
        assert_fails(check, fn, label, *hints)


def test_a_numpy_table_breaks_the_cells_after_the_check():
    """Why 1.5 refuses numpy: the lesson's next cells call .float() on the table."""
    with pytest.raises(AttributeError):
        pos_embed_vectorised(8, 2).numpy().float()


def test_checks_are_deterministic(capsys):
    for check, fn in (
        (lesson01.check_patchify, patchify_right),
        (lesson01.check_unpatchify, unpatchify_right),
        (lesson01.check_patch_embed_as_linear, embed_right_dtype),
        (lesson01.check_pos_embed, pos_embed_vectorised),
    ):
        check(fn)
    first = None
    for _ in range(2):
        with pytest.raises(ExerciseFailed) as info:
            lesson01.check_pos_embed(lambda D, g: torch.from_numpy(np.zeros((g * g, D))))
        first = first or str(info.value)
        assert str(info.value) == first


MUTANTS = {  # exercise -> its mutants, for the course's mutant table
    "1.1 (patchify)": PATCHIFY_MUTANTS,
    "1.2 (patchify_einops)": PATCHIFY_MUTANTS,
    "1.3 (unpatchify)": UNPATCHIFY_MUTANTS,
    "1.4 (patch_embed_as_linear)": EMBED_MUTANTS,
    "1.5 (pos_embed)": POS_MUTANTS,
}
CHECKS = {
    "1.1 (patchify)": lesson01.check_patchify,
    "1.2 (patchify_einops)": lesson01.check_patchify_einops,
    "1.3 (unpatchify)": lesson01.check_unpatchify,
    "1.4 (patch_embed_as_linear)": lesson01.check_patch_embed_as_linear,
    "1.5 (pos_embed)": lesson01.check_pos_embed,
}
