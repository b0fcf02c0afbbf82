"""Text-conditioned toy DiTs (lesson 12): PixArt-α's cross-attention with adaLN-single, SD3's MMDiT joint attention.

The data are toy shapes with captions ("a small red circle at the top"): four attributes (``ATTRIBUTES``), one
shape per 16x16 image, drawn with ``minidit.toy``'s counter-based random numbers and SDF renderer, so image ``i``
is a pure function of ``(seed, i)``. A tiny learned ``TextEncoder`` (word embedding + learned positions + a
2-layer transformer) turns the caption into tokens [B, L, D]; it trains jointly with the DiT. Two ways to let the
image tokens read the caption:

- **PixArt-α** (Chen et al. 2023, §2.3, Fig. 4): each ``PixArtBlock`` is self-attention, then **cross-attention**
  (queries from the image tokens, keys and values from the text tokens, padding masked), then the MLP. The
  timestep is the only adaLN input, and **adaLN-single** computes its six modulation vectors ONCE per model
  (``t_block``: SiLU + Linear D -> 6D); each block adds its own learned ``scale_shift_table`` [6, D] to them.
  The cross-attention is not modulated; its output projection starts at zero, so a fresh model ignores the text.
- **MMDiT** (SD3, Esser et al. 2024, §4, Fig. 2): text and image tokens are two streams, each with its own
  adaLN-Zero modulation, qkv, output projection and MLP; **joint attention** runs once over the concatenated
  sequence [c; x], so text reads image and image reads text. The adaLN input is the timestep embedding plus
  the pooled text (here: the mean of the text encoder's output over the caption's tokens, through an MLP).

Both are trained with flow matching (``minidit.flow.FlowMatching``, the objective of SD3; PixArt-α trained with
DDPM, as DiT) and sampled with Euler and classifier-free guidance (the null caption is the empty one; captions
drop to it 10% of the time in training). What is simplified compared with the real systems: a 17-word
vocabulary and a text encoder trained from scratch on 72 captions (PixArt-α: frozen T5-XXL, 120 tokens; SD3: two
CLIPs and T5-XXL, whose pooled CLIP vectors feed adaLN), pixels instead of VAE latents, no caption projection
MLP (the text encoder's width is the DiT's), no QK-normalisation (SD3 §5.3.2), every MMDiT block with a full
text stream (SD3's last one drops the text MLP), uniform t instead of SD3's logit-normal (§3.1), and minutes of
CPU training instead of GPU-months.

``CaptionClassifier`` (a small CNN with one head per attribute, ``data/toy_caption_classifier.safetensors``)
measures whether samples show what their caption asks for: ``score(images, attrs)``.

Command line::

    python -m minidit.captions train --arch pixart --run-dir runs/captions-pixart
    python -m minidit.captions export runs/captions-pixart --out data/toy_pixart.safetensors
    python -m minidit.captions eval --arch pixart          # per-attribute accuracy of CFG samples
    python -m minidit.captions train-classifier
    python -m minidit.captions preview --out captions.png [--arch pixart]
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .embed import PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, unpatchify
from .errors import ArgumentParser, UserError, guidance_scale, positive_int, run_cli
from .model import FinalLayer, Mlp, modulate, residual_branch
from .toy import as_indices, random_words, render, shift_right, uniform

# --------------------------------------------------------------------------
# Toy captions: attributes, images, tokens
# --------------------------------------------------------------------------

#: attribute -> its values; an image's attributes are indices into these lists.
ATTRIBUTES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue"],
    "shape": ["circle", "square", "triangle"],  # minidit.toy's first three shapes (its SDFs are reused)
    "size": ["small", "large"],
    "position": ["top", "bottom", "left", "right"],
}
COLOURS = {"red": (0.90, 0.16, 0.12), "green": (0.18, 0.78, 0.22), "blue": (0.16, 0.42, 0.96)}  # RGB in [0, 1]
COLOUR_JITTER = 0.06
SIZES = {"small": (0.38, 0.44), "large": (0.58, 0.64)}  # circumradius range, units of half the image side
MARGIN = 0.04
MAX_ROTATION = 10.0  # degrees, as minidit.toy
_PLACE = {"top": (1, -1), "bottom": (1, 1), "left": (0, -1), "right": (0, 1)}  # (axis: 0 = x, 1 = y; sign)
_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}

#: Word list; id 0 pads, id 1 starts every caption (so even the empty caption has one token to attend to).
VOCAB: list[str] = ["<pad>", "<start>", "a", "shape", "at", "on", "the"] + [
    word for values in ATTRIBUTES.values() for word in values
]
PAD_ID, START_ID = 0, 1
MAX_LEN = 10  # tokens per caption: <start> + at most 9 words (a full caption has 7)
_WORD_ID = {word: i for i, word in enumerate(VOCAB)}

#: Attribute combinations (colour, shape, size, position) never shown in training (``make_batch(...,
#: train_split=True)`` moves them one position on): the compositional held-out split of ``evaluate``.
HELD_OUT_COMBOS: list[tuple[str, str, str, str]] = [
    ("red", "triangle", "large", "left"),
    ("green", "circle", "small", "bottom"),
    ("blue", "square", "large", "top"),
    ("green", "square", "small", "right"),
    ("blue", "circle", "small", "left"),
    ("red", "square", "large", "bottom"),
]
_HELD_OUT_IDS = torch.tensor(
    [[ATTRIBUTES[name].index(word) for name, word in zip(ATTRIBUTES, combo)] for combo in HELD_OUT_COMBOS]
)  # [6, 4]


def caption(attrs: Mapping[str, int | str]) -> str:
    """One caption from attribute indices or words: {"colour": 0, "shape": 0, "size": 0, "position": 0} ->
    "a small red circle at the top". Missing attributes are left out ("a red circle"; no shape: "a red shape")."""
    words = {}
    for name, value in attrs.items():
        if name not in ATTRIBUTES:
            raise UserError(f"unknown attribute {name!r}; the attributes are {', '.join(ATTRIBUTES)}")
        values = ATTRIBUTES[name]
        word = value if isinstance(value, str) else values[int(value)] if 0 <= int(value) < len(values) else None
        if word not in values:
            raise UserError(f"{name} must be one of {', '.join(values)} (or 0..{len(values) - 1}), got {value!r}")
        words[name] = word
    text = " ".join(w for w in ("a", words.get("size"), words.get("colour"), words.get("shape", "shape")) if w)
    return f"{text} {_PHRASE[words['position']]}" if "position" in words else text


def captions_of(attrs: Mapping[str, torch.Tensor]) -> list[str]:
    """The captions of a batch: attrs name -> LongTensor [B] -> B captions."""
    n = len(next(iter(attrs.values())))
    return [caption({name: int(v[i]) for name, v in attrs.items()}) for i in range(n)]


def tokenize(captions: Sequence[str], max_len: int = MAX_LEN) -> torch.Tensor:
    """Captions -> LongTensor [B, max_len]: <start>, one id per word (``VOCAB``), then padding (id 0).
    An unknown word or a caption too long raises ``UserError`` (one line)."""
    rows = []
    for text in captions:
        words = text.lower().split()
        unknown = [w for w in words if w not in _WORD_ID or _WORD_ID[w] <= START_ID]
        if unknown:
            raise UserError(f"unknown word {unknown[0]!r} in caption {text!r}; the vocabulary is {' '.join(VOCAB[2:])}")
        if len(words) > max_len - 1:
            raise UserError(f"caption {text!r} has {len(words)} words; at most {max_len - 1} fit")
        ids = [START_ID] + [_WORD_ID[w] for w in words]
        rows.append(ids + [PAD_ID] * (max_len - len(ids)))
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), max_len)


def make_batch(
    indices, seed: int = 0, image_size: int = 16, train_split: bool = False, max_rotation: float = MAX_ROTATION
) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """Captioned toy images: indices int64 [B] -> (images float32 [B, 3, S, S] in [-1, 1], B captions,
    attrs name -> int64 [B]). Image i depends only on (seed, indices[i], image_size, train_split), as in
    ``minidit.toy.make_batch``: 11 splitmix64 words per index pick the attributes (uniform), the radius, the
    place and the rotation, and ``toy.render`` draws the shape. ``train_split``: combinations in
    ``HELD_OUT_COMBOS`` move one position on (top -> bottom -> left -> right -> top), so training never sees them.
    Positions: the shape's centre sits 75-100% of the way from the middle to the border along one axis, within
    +-40% of that room on the other; (x, y) with y pointing down, as the rows."""
    indices = as_indices(indices)
    words = random_words(indices, seed, count=11)
    u = uniform(words)  # [B, 11]
    attrs = {name: shift_right(words[:, k], 1) % len(values) for k, (name, values) in enumerate(ATTRIBUTES.items())}
    if train_split:
        combo = torch.stack(list(attrs.values()), dim=1)  # [B, 4]
        held = (combo[:, None] == _HELD_OUT_IDS[None]).all(dim=2).any(dim=1)
        attrs["position"] = torch.where(held, (attrs["position"] + 1) % 4, attrs["position"])
    lo, hi = torch.tensor([SIZES[s] for s in ATTRIBUTES["size"]]).unbind(1)  # [2] each
    radius = lo[attrs["size"]] + (hi - lo)[attrs["size"]] * u[:, 4]
    room = 1 - MARGIN - radius
    place = torch.tensor([_PLACE[p] for p in ATTRIBUTES["position"]])[attrs["position"]]  # [B, 2] (axis, sign)
    along = place[:, 1] * room * (0.75 + 0.25 * u[:, 5])
    across = room * 0.4 * (2 * u[:, 6] - 1)
    centre = torch.where((place[:, :1] == 0), torch.stack([along, across], 1), torch.stack([across, along], 1))
    t = math.tan(math.radians(max_rotation) / 2) * (2 * u[:, 7] - 1)  # the rotation as toy.sample_params draws it
    rotation = torch.stack([(1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)], dim=1)
    base = torch.tensor([COLOURS[c] for c in ATTRIBUTES["colour"]])[attrs["colour"]]
    colour = (base + COLOUR_JITTER * (2 * u[:, 8:11] - 1)).clamp(0, 1)
    params = {"label": attrs["shape"], "radius": radius, "centre": centre, "rotation": rotation, "colour": colour}
    return render(params, image_size), captions_of(attrs), attrs


# --------------------------------------------------------------------------
# Attention with a padding mask, and the text encoder
# --------------------------------------------------------------------------


def masked_attention(q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys where ``key_mask`` is True. q: [B, H, T, d], k, v: [B, H, L, d],
    key_mask: bool [B, L] (None: all keys) -> [B, H, T, d]. Masked keys get weight exactly 0."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MultiHeadCrossAttention(nn.Module):
    """Queries from x [B, T, D], keys and values from y [B, L, D] (PixArt-α's names: ``q_linear``, ``kv_linear``,
    ``proj``); y_mask: bool [B, L], True for real tokens -> [B, T, D]. With y = x it is masked self-attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        (B, T, D), L, H = x.shape, y.shape[1], self.num_heads
        q = self.q_linear(x).view(B, T, H, D // H).transpose(1, 2)  # [B, H, T, d]
        k, v = self.kv_linear(y).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, d] each
        return self.proj(masked_attention(q, k, v, y_mask).transpose(1, 2).reshape(B, T, D))


class TextEncoderLayer(nn.Module):
    """A pre-LN transformer encoder layer with a padding mask: x [B, L, D], mask [B, L] -> [B, L, D]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadCrossAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """A tiny text encoder trained with the DiT (standing in for T5 / CLIP): tokens [B, L] ->
    (text tokens float [B, L, D], mask bool [B, L], True where a token is not padding).
    Word embedding + learned positions + ``depth`` pre-LN layers (padding masked as keys) + a final LayerNorm."""

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 128, depth: int = 2, heads: int = 4,
                 max_len: int = MAX_LEN):  # fmt: skip
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.layers = nn.ModuleList([TextEncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD_ID
        x = self.token_embedding(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x), mask


# --------------------------------------------------------------------------
# The blocks
# --------------------------------------------------------------------------


class PixArtBlock(nn.Module):
    """PixArt-α's block (§2.3): x [B, T, D], y [B, L, D] text, t6 [B, 6D] = ``t_block(t_emb)`` shared by all
    blocks, y_mask bool [B, L] -> [B, T, D]:

        shift, scale, gate (attention), shift, scale, gate (MLP) = scale_shift_table + t6   (adaLN-single)
        x = x + gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
        x = x + CrossAttn(x, y, y_mask)                       (not modulated)
        x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    The block's only adaLN parameters are ``scale_shift_table`` [6, D] (init N(0, 1/D), as PixArt-α), against
    DiT's 6D (D + 1) per block. ``cross_attn.proj`` starts at zero: a fresh block ignores the text."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        nn.init.zeros_(self.cross_attn.proj.weight)
        nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(self, x, y, t6, y_mask=None) -> torch.Tensor:
        params = (self.scale_shift_table[None] + t6.view(x.shape[0], 6, -1)).flatten(1)  # [B, 6D]
        attn_params, mlp_params = params.chunk(2, dim=1)  # (shift, scale, gate) each, DiT's layout
        x = residual_branch(x, self.norm1, self.attn, attn_params)
        x = x + self.cross_attn(x, y, y_mask)
        return residual_branch(x, self.norm2, self.mlp, mlp_params)


class _Stream(nn.Module):
    """One MMDiT stream's own weights: adaLN-Zero modulation (6D from vec), qkv + proj, MLP (SD3's names)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)  # its qkv and proj; the attention itself is joint
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: the stream starts as the identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def qkv(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> q, k, v stacked [3, B, H, N, d]."""
        B, N, D = x.shape
        H = self.attn.num_heads
        return self.attn.qkv(modulate(self.norm1(x), shift, scale)).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)


class MMDiTBlock(nn.Module):
    """SD3's MMDiT block (§4, Fig. 2b): image tokens x [B, T, D] and text tokens c [B, L, D], each stream with its
    own adaLN-Zero modulation from vec [B, D] (timestep embedding + pooled text), qkv, proj and MLP; one
    **joint attention** over the concatenation [c; x] (padded text tokens masked as keys: mask bool [B, L]).
    Returns (x, c). A fresh block is the identity on both streams (every gate 0)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.context_block = _Stream(hidden_size, num_heads, mlp_ratio)
        self.x_block = _Stream(hidden_size, num_heads, mlp_ratio)

    def forward(self, x, c, vec, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        (B, T, D), L = x.shape, c.shape[1]
        streams, outs = (self.context_block, self.x_block), []
        mods = [s.adaLN_modulation(vec).chunk(6, dim=1) for s in streams]  # shift, scale, gate x (attn, MLP)
        q, k, v = torch.cat([s.qkv(h, m[0], m[1]) for s, h, m in zip(streams, (c, x), mods)], dim=3)
        key_mask = None if mask is None else torch.cat([mask, mask.new_ones(B, T)], dim=1)  # [B, L + T]
        joint = masked_attention(q, k, v, key_mask).transpose(1, 2).reshape(B, L + T, D)
        for s, h, m, a in zip(streams, (c, x), mods, joint.split([L, T], dim=1)):
            h = h + m[2][:, None] * s.attn.proj(a)
            outs.append(h + m[5][:, None] * s.mlp(modulate(s.norm2(h), m[3], m[4])))
        return outs[1], outs[0]


class T2IFinalLayer(nn.Module):
    """PixArt-α's final layer: LN, modulated by (shift, scale) = scale_shift_table [2, D] + t_emb, then a Linear
    to p*p*C per token. x [B, T, D], t [B, D] -> [B, T, p*p*C]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

ARCHS = ("pixart", "mmdit")


class CaptionDiT(nn.Module):
    """A caption-conditioned DiT: forward(x [B, 3, S, S], t [B] (1000 x flow time), tokens [B, L]) -> velocity
    [B, 3, S, S]. ``arch`` "pixart" (``PixArtBlock``, adaLN-single) or "mmdit" (``MMDiTBlock``, joint attention).
    Patch embedding + fixed 2-D sin-cos positions (``minidit.embed``), ``TimestepEmbedder``, ``TextEncoder``
    (width ``hidden_size``, ``text_depth`` layers). Captions drop to the null (empty) caption with probability
    ``caption_dropout_prob`` in training mode, or where ``force_drop_ids`` is 1."""

    def __init__(self, arch: str = "pixart", image_size: int = 16, patch_size: int = 2, in_channels: int = 3,
                 hidden_size: int = 128, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
                 text_depth: int = 2, max_len: int = MAX_LEN, caption_dropout_prob: float = 0.1):  # fmt: skip
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        self.arch, self.patch_size, self.out_channels = arch, patch_size, in_channels
        self.max_len, self.caption_dropout_prob = max_len, caption_dropout_prob
        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.text_encoder = TextEncoder(len(VOCAB), hidden_size, text_depth, num_heads, max_len)
        if arch == "pixart":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # adaLN-single
            self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
            self.final_layer = T2IFinalLayer(hidden_size, patch_size, in_channels)
        else:
            self.y_embedder = Mlp(hidden_size, hidden_size)  # pooled text -> added to the timestep embedding
            self.blocks = nn.ModuleList([MMDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
            self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier Linears with zero bias (as DiT), the sin-cos table, N(0, 0.02) timestep MLP (and ``t_block``);
        zero: the output Linear, PixArt's cross-attention projections, MMDiT's adaLN regressors (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(table).float()[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        normal = [self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        zeroed = [self.final_layer.linear]
        if self.arch == "pixart":
            normal.append(self.t_block[1].weight)
            zeroed += [block.cross_attn.proj for block in self.blocks]
        else:
            zeroed += [s.adaLN_modulation[-1] for b in self.blocks for s in (b.x_block, b.context_block)]
            zeroed.append(self.final_layer.adaLN_modulation[-1])
        for weight in normal:
            nn.init.normal_(weight, std=0.02)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_tokens(self, n: int, device=None) -> torch.Tensor:
        """The null caption's tokens [n, L]: <start> and padding (the empty caption)."""
        return tokenize([""] * n, self.max_len).to(device)

    def forward(self, x, t, tokens, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is None and self.training and self.caption_dropout_prob > 0:
            force_drop_ids = torch.rand(tokens.shape[0], device=tokens.device) < self.caption_dropout_prob
        if force_drop_ids is not None:
            null = self.null_tokens(tokens.shape[0], tokens.device)
            tokens = torch.where(force_drop_ids.view(-1, 1).bool(), null, tokens)
        x = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        t_emb = self.t_embedder(t)  # [B, D]
        y, mask = self.text_encoder(tokens)  # [B, L, D], [B, L]
        if self.arch == "pixart":
            t6 = self.t_block(t_emb)  # [B, 6D], once for all blocks
            for block in self.blocks:
                x = block(x, y, t6, mask)
            x = self.final_layer(x, t_emb)
        else:
            m = mask[..., None].to(y.dtype)
            vec = t_emb + self.y_embedder((y * m).sum(1) / m.sum(1))  # + pooled text [B, D]
            for block in self.blocks:
                x, y = block(x, y, vec, mask)
            x = self.final_layer(x, vec)
        return unpatchify(x, self.patch_size, self.out_channels)  # [B, C, S, S]

    def forward_with_cfg(self, x, t, tokens, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batched pass: v_null + s (v_caption - v_null). x [B, C, S, S], t [B],
        tokens [B, L] -> [B, C, S, S] (a batch of B, not DiT's doubled batch)."""
        B = x.shape[0]
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([tokens, self.null_tokens(B, x.device)]))
        cond, uncond = out[:B], out[B:]
        return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def generate(model: CaptionDiT, captions: Sequence[str] | torch.Tensor, cfg_scale: float = 4.0, steps: int = 20,
             seed: int = 0, image_size: int | None = None, progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Euler samples of the flow ODE with CFG: captions (or tokens [B, L]) -> images [B, 3, S, S] in [-1, 1].
    Sample i starts from noise of ``runtime.sample_generator(seed, i)``; x0_hat is clipped to [-1, 1]."""
    from .flow import FlowMatching
    from .runtime import sample_generator

    tokens = captions if isinstance(captions, torch.Tensor) else tokenize(captions, model.max_len)
    device = next(model.parameters()).device
    s = image_size or model.x_embedder.img_size
    c = model.out_channels
    noise = torch.stack([torch.randn(c, s, s, generator=sample_generator(seed, i)) for i in range(len(tokens))])
    fn = partial(model.forward_with_cfg, cfg_scale=cfg_scale)
    flow = FlowMatching(num_timesteps=steps)
    out = flow.sample_loop(fn, noise.shape, noise=noise.to(device), model_kwargs=dict(tokens=tokens.to(device)),
                           progress=progress, clip_denoised=True)  # fmt: skip
    return out.clamp(-1, 1).cpu()


# --------------------------------------------------------------------------
# Measuring: an attribute classifier
# --------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_CLASSIFIER = DATA_DIR / "toy_caption_classifier.safetensors"
CLASSIFIER_COMMAND = "python -m minidit.captions train-classifier"
CLASSIFIER_MAX_ROTATION = 30.0  # the classifier sees more rotation than the DiTs' data, to be lenient on samples


class CaptionClassifier(nn.Module):
    """A small CNN with one head per attribute: x [N, 3, S, S] in [-1, 1] -> {attribute: logits [N, values]}.

    Three 3x3 convs (32, 64, 64 channels, ReLU, 2x2 max-pool after the first two), then the feature map is
    flattened (not pooled: the position is an attribute) into a 128-wide hidden layer and one Linear whose
    outputs are split per attribute. Images of another size than ``image_size`` are resized first."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.register_buffer("image_size", torch.tensor(image_size, dtype=torch.int64))
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, 128)
        self.heads = nn.Linear(128, sum(len(v) for v in ATTRIBUTES.values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = int(self.image_size)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc(F.relu(self.conv3(x)).flatten(1)))
        logits = self.heads(x).split([len(v) for v in ATTRIBUTES.values()], dim=1)
        return dict(zip(ATTRIBUTES, logits))


def load_caption_classifier(path: str | os.PathLike | None = None) -> CaptionClassifier:
    """The shipped attribute classifier (``data/toy_caption_classifier.safetensors``), or ``path``, in eval mode.
    A missing or unfitting file raises ``UserError`` naming the command that makes one."""
    from .checkpoint import CheckpointError, read_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER
    if not path.is_file():
        raise UserError(f"no caption classifier at {path}: train one with `{CLASSIFIER_COMMAND} --out {path}`")
    try:
        state = read_file(path)
        classifier = CaptionClassifier(int(state["image_size"]))
        classifier.load_state_dict(state)
    except (CheckpointError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} is not a caption classifier ({str(e).splitlines()[0]})") from None
    return classifier.eval()


@torch.no_grad()
def predict(images: torch.Tensor, classifier: CaptionClassifier | None = None) -> dict[str, torch.Tensor]:
    """Predicted attributes of images [N, 3, S, S]: {attribute: int64 [N]} (the shipped classifier by default)."""
    classifier = classifier or load_caption_classifier()
    out = classifier(images.float())
    return {name: logits.argmax(dim=1) for name, logits in out.items()}


def score(images: torch.Tensor, attrs: Mapping[str, torch.Tensor], classifier=None) -> dict[str, float]:
    """How often the images show what was asked: {attribute: accuracy} for each attribute in ``attrs``
    (name -> int64 [N]), and "all": the fraction with every one of those attributes right."""
    pred = predict(images, classifier)
    right = {name: pred[name] == torch.as_tensor(attrs[name]) for name in attrs}
    result = {name: r.float().mean().item() for name, r in right.items()}
    result["all"] = torch.stack(list(right.values())).all(dim=0).float().mean().item()
    return result


# --------------------------------------------------------------------------
# The shipped caption DiTs
# --------------------------------------------------------------------------

#: The shipped models' sizes (16x16 px, patch 4: 16 image tokens, 10 text tokens). An MMDiT block holds two
#: streams' weights, so the MMDiT is shallower (and its separate text encoder has one layer: its text stream
#: keeps refining the text) to stay near PixArt's parameter count and under 4 MB in fp16.
MODEL_CONFIGS: dict[str, dict] = {
    "pixart": dict(image_size=16, patch_size=4, hidden_size=128, depth=4, num_heads=4, text_depth=2),
    "mmdit": dict(image_size=16, patch_size=4, hidden_size=128, depth=3, num_heads=4, text_depth=1, mlp_ratio=3.0),
}
_MODEL_KEYS = ("arch", "image_size", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "text_depth",
               "max_len", "caption_dropout_prob")  # fmt: skip


def shipped_path(arch: str) -> Path:
    return DATA_DIR / f"toy_{arch}.safetensors"


def train_command(arch: str) -> str:
    return (f"OMP_NUM_THREADS=1 python -m minidit.captions train --arch {arch} --run-dir runs/captions-{arch} && "
            f"python -m minidit.captions export runs/captions-{arch} --out data/toy_{arch}.safetensors")  # fmt: skip


def model_from_config(config: Mapping) -> CaptionDiT:
    """A fresh ``CaptionDiT`` from a (training) config: the keys of its constructor that the config holds."""
    return CaptionDiT(**{k: config[k] for k in _MODEL_KEYS if k in config})


def load_caption_dit(arch: str = "pixart", path: str | os.PathLike | None = None) -> tuple[CaptionDiT, dict]:
    """The shipped caption DiT ``data/toy_{arch}.safetensors`` (or ``path``): (model in eval mode, float32, loaded
    strictly; its training config: arch, sizes, steps, seed, ...). Sample it with ``generate(model, captions)``.
    A missing file raises ``UserError`` naming the command that makes it."""
    from .checkpoint import CheckpointError, read_file

    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    path = Path(path) if path is not None else shipped_path(arch)
    if not path.is_file():
        raise UserError(f"no caption DiT at {path}: make one with `{train_command(arch)}`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {})["config"])
        if config.get("arch") != arch:
            raise ValueError(f"it holds a {config.get('arch')!r} model, not {arch!r}")
        model = model_from_config(config)
        model.load_state_dict({k: v.float() for k, v in read_file(path).items()}, strict=True)
    except (CheckpointError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path} is not a caption DiT file ({str(e).splitlines()[0]})") from None
    return model.eval(), config


# --------------------------------------------------------------------------
# Command line (training, export and evaluation live in minidit.captions_train)
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from . import captions_train as ct

    parser = ArgumentParser(prog="python -m minidit.captions", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a caption DiT (flow matching) in a run directory")
    train.add_argument("--arch", choices=ARCHS, default="pixart")
    train.add_argument("--run-dir", type=Path, help="default runs/captions-ARCH")
    train.add_argument("--steps", type=positive_int, default=ct.STEPS, help=f"optimizer steps (default {ct.STEPS})")
    train.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default 64)")
    train.add_argument("--seed", type=int, default=0, help="data, noise and initialisation seed (default 0)")
    export = commands.add_parser("export", help="write a run's EMA weights (fp16) to data/toy_ARCH.safetensors")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="default data/toy_ARCH.safetensors")
    ev = commands.add_parser("eval", help="per-attribute accuracy of CFG samples (the attribute classifier)")
    ev.add_argument("--arch", choices=ARCHS, default="pixart")
    ev.add_argument("--ckpt", type=Path, help="a caption DiT file (default data/toy_ARCH.safetensors)")
    ev.add_argument("-n", type=positive_int, default=200, help="samples of random captions (default 200)")
    ev.add_argument("--per-held-out", type=positive_int, default=20, help="samples per held-out combination")
    ev.add_argument(
        "--cfg-scale", type=guidance_scale, nargs="+", default=[1.0, 4.0], help="guidance scales (default 1 4)"
    )
    ev.add_argument("--steps", type=positive_int, default=20, help="Euler steps (default 20)")
    ev.add_argument("--seed", type=int, default=0, help="sample noise seed (default 0)")
    clf = commands.add_parser("train-classifier", help="train the attribute classifier")
    clf.add_argument("--steps", type=positive_int, default=800, help="optimizer steps (default 800)")
    clf.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    clf.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER, help="default " + DEFAULT_CLASSIFIER.name)
    preview = commands.add_parser("preview", help="a grid of captioned toy images, or of a caption DiT's samples")
    preview.add_argument("--out", type=Path, default=Path("captions_preview.png"), help="PNG path")
    preview.add_argument("--arch", choices=ARCHS, help="sample this shipped model instead of showing data")
    preview.add_argument("--caption", nargs="+", action="extend", help="captions to sample (default: 16 from the data)")
    preview.add_argument("--cfg-scale", type=guidance_scale, default=4.0)
    preview.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "preview" and args.caption and args.arch is None:
        parser.error("--caption needs --arch: without it, preview shows the data, which has its own captions")
    return ct.run_command(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
