"""minidit.attention.tiled_attention: FlashAttention's tiled online-softmax forward equals math attention."""

import math

import pytest
import torch

from minidit.attention import math_attention, tiled_attention


def softmax_by_hand(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, row by row from the definition (no max subtraction needed)."""
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    w = s.exp()
    return (w / w.sum(-1, keepdim=True)) @ v.double()


@pytest.mark.parametrize("T, S, block", [(37, 37, 8), (16, 16, 16), (5, 23, 4), (12, 12, 1), (9, 9, 64)])
def test_tiled_equals_softmax_attention(T, S, block):
    g = torch.Generator().manual_seed(T * 100 + S)
    q, k = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, S, 8, generator=g).double()
    v = torch.randn(2, 3, S, 5, generator=g, dtype=torch.float64)
    got = tiled_attention(q, k, v, block)
    assert got.dtype == torch.float64 and got.shape == (2, 3, T, 5)
    torch.testing.assert_close(got, softmax_by_hand(q, k, v), atol=1e-12, rtol=1e-12)


def test_tiled_keeps_dtype_and_survives_large_scores():
    """Scores of several hundred overflow exp() in float32 without the running max; the tiled version does not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    q = q * 60
    got = tiled_attention(q, k, v, 6)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, math_attention(q.double(), k.double(), v.double()).float(), atol=1e-5, rtol=1e-5)
    half = tiled_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 6)
    assert half.dtype == torch.bfloat16


def test_tiled_rejects_a_bad_block_size():
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="block_size"):
        tiled_attention(q, q, q, 0)
