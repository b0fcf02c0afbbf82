"""Multi-head self-attention with switchable backends (lessons 03 and 09).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V

Backends, all computing the same function:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``,
  which picks a fused kernel (FlashAttention-2, memory-efficient, or math).
- ``"math"``: the explicit softmax formula above; the teaching baseline and
  what the reference recipe's benchmark uses.
- ``"flash_attn"``: the ``flash-attn`` package's ``flash_attn_func``. It needs
  CUDA tensors in fp16/bf16 laid out [B, N, H, d_head]. Where that does not
  hold (no package, CPU, fp32) it warns once and uses ``"sdpa"``.

``tiled_attention`` is FlashAttention's tiled algorithm (the online softmax) in
plain PyTorch: the same function in O(N) memory, slowly; the reference for
lesson 09, not a backend.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "math", "flash_attn")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional GPU extra
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_func


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out. q, k, v: [B, H, N, d] -> [B, H, N, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    attn = attn.softmax(dim=-1)
    return attn @ v


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """FlashAttention's tiled forward with the online softmax (Dao et al. 2022, Algorithm 1), in PyTorch.

    q: [B, H, T, d], k: [B, H, S, d], v: [B, H, S, d_v] -> [B, H, T, d_v] in q's dtype. Equal to
    ``math_attention`` up to float rounding, but never holds more than one [B, H, block, block] tile of
    scores: each query tile keeps a running row maximum m, a running sum l of exp(s - m) and an
    accumulator of exp(s - m) v; when a new key tile raises m, l and the accumulator are rescaled by
    exp(m_old - m_new). The division by l happens once, at the end. Accumulates in float32 at least
    (float64 stays float64). Lesson 09 has the learner write it; this is the reference for its check.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i in range(0, q.shape[-2], block_size):  # query tiles; the last one may be shorter
        q_i = q[..., i : i + block_size, :].to(acc_dtype) * scale  # [B, H, b, d]
        m = q_i.new_full((*q_i.shape[:-1], 1), -math.inf)  # running row max
        row_sum = q_i.new_zeros(*q_i.shape[:-1], 1)  # running sum l of exp(s - m)
        acc = q_i.new_zeros(*q_i.shape[:-1], v.shape[-1])  # running sum of exp(s - m) v
        for j in range(0, k.shape[-2], block_size):  # key/value tiles
            s = q_i @ k[..., j : j + block_size, :].to(acc_dtype).transpose(-2, -1)  # [B, H, b, b']
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - m_new)
            correction = torch.exp(m - m_new)  # rescales what was summed under the old max
            row_sum = correction * row_sum + p.sum(dim=-1, keepdim=True)
            acc = correction * acc + p @ v[..., j : j + block_size, :].to(acc_dtype)
            m = m_new
        out[..., i : i + block_size, :] = (acc / row_sum).to(out.dtype)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention. q, k, v: [B, H, N, d] -> [B, H, N, d]."""
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "flash_attn":
        fn = _flash_attn_func()
        if fn is None:
            _warn_once(
                "import", "attention backend 'flash_attn': the flash-attn package is not importable; using 'sdpa'"
            )
        elif not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            _warn_once(
                "dtype",
                f"attention backend 'flash_attn' needs CUDA fp16/bf16 tensors (got {q.device.type} {q.dtype}); "
                "using 'sdpa' for those calls",
            )
        else:
            # flash_attn_func takes and returns [B, N, H, d].
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
    elif backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. x: [B, N, D] -> [B, N, D].

    State-dict keys as in the reference: ``qkv`` (Linear D -> 3D, q, k, v in that
    order, with bias) and ``proj`` (Linear D -> D, with bias).
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, d]
        x = attention(q, k, v, self.backend)  # [B, H, N, d]
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)
