"""Embeddings: images to tokens and back, positions, timesteps and labels.

Lessons 01 (patchify) and 02 (conditioning). Names follow the DiT paper and its
reference release: ``x_embedder``, ``t_embedder``, ``y_embedder``, ``pos_embed``.

Shapes: B = batch, C = channels, H x W = image (or latent) size, p = patch size,
h x w = H/p x W/p the token grid, T = h*w tokens, D = hidden size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into non-overlapping p x p patches, one token per patch.

    x: [B, C, H, W] -> [B, T, p*p*C], tokens in row-major order over the
    (H/p) x (W/p) grid, each token laid out (p_row, p_col, channel): channels
    *last*, the order the DiT's final layer predicts (see ``unpatchify``).
    """
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, T, p*p*c] -> [B, c, h*p, w*p] with h = w = sqrt(T).

    This is the reference DiT's order: each token is viewed as [p, p, c]
    (channels last), the grid as [h, w], and the result is [B, c, h*p, w*p].
    """
    h = w = int(round(x.shape[1] ** 0.5))
    if h * w != x.shape[1]:
        raise ValueError(f"unpatchify expects a square token grid, got T={x.shape[1]}")
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p, c=c)


class PatchEmbed(nn.Module):
    """Patch embedding: a Conv2d with kernel = stride = p, i.e. one shared Linear
    applied to every flattened p x p x C patch.

    x: [B, C, H, W] -> [B, T, D]. The state-dict keys are ``proj.weight``
    [D, C, p, p] and ``proj.bias`` [D], as in the reference (timm's PatchEmbed).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not divisible by patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected inputs of size {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        x = self.proj(x)  # [B, D, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, T, D], row-major tokens


# --------------------------------------------------------------------------
# Fixed 2D sin-cos position table (computed in float64, as the reference does)
# --------------------------------------------------------------------------


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos embedding of positions ``pos`` (any shape, M values) -> [M, embed_dim].

    omega_i = 1 / 10000^(i / (embed_dim/2)), i = 0 .. embed_dim/2 - 1;
    the embedding is concat(sin(pos * omega), cos(pos * omega)): sines first.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / np.power(10000.0, np.arange(half, dtype=np.float64) / half)  # [D/2]
    angles = np.outer(pos.astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """2D sin-cos position table for a grid_size x grid_size grid -> [T, embed_dim] (float64).

    Tokens are row-major (row by row). The first embed_dim/2 channels encode the
    token's *column* index, the last embed_dim/2 its *row* index.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # [h, w] each
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # [T, D/2]
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)  # [T, D/2]
    return np.concatenate([emb_col, emb_row], axis=1)


# --------------------------------------------------------------------------
# Conditioning: timestep and class label
# --------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. t: [B] -> [B, dim].

    freqs_i = exp(-ln(max_period) * i / half), i = 0 .. half-1, half = dim // 2,
    embedding = concat(cos(t * freqs), sin(t * freqs)): **cos first**. t is the
    raw step index (0 .. 999), not rescaled. Computed in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t: [B] -> [B, D]: the 256-dim sinusoidal embedding, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y: [B] int labels -> [B, D], with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; the last row
    (index ``num_classes``) is the "null" label. In training mode each label is
    replaced by the null label with probability ``dropout_prob``; ``force_drop_ids``
    (1 = drop) overrides the coin flips. In eval mode nothing is dropped.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        rows = num_classes + 1 if dropout_prob > 0 else num_classes  # + the null label, when labels can drop
        self.embedding_table = nn.Embedding(rows, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """labels [B] -> [B], the dropped ones replaced by the null label ``num_classes``."""
        if force_drop_ids is None:
            # One uniform draw per label from the global generator, kept when >= p: the reference
            # draws the same way, so one seed drops the same labels in both.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.eq(1)
        return labels.masked_fill(drop, self.num_classes)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
