"""Spacetime patches: a DiT for video, Sora-style, trained for real on toy videos (lesson 12).

Sora's technical report ("Video generation models as world simulators", OpenAI 2024) describes a diffusion
*transformer* on "spacetime patches": a video (or its latent) is cut into small tubes, p x p pixels over pt
frames, each tube becomes one token, and a plain transformer attends over all of them. This module is that
idea at toy scale, built from the image DiT's own parts:

    video x [B, C, F, S, S] --Conv3d, kernel = stride = (pt, p, p)--> tokens [B, T, D] (+ fixed 3-D sin-cos)
    c = t_embedder(t) + y_embedder(y)                                    (model.DiT's conditioning)
    N x model.DiTBlock: full attention over all T = (F/pt)(S/p)^2 tokens (space and time together)
    model.FinalLayer --unpatchify_spacetime--> velocity [B, C, F, S, S]

trained with flow matching (``minidit.flow.FlowMatching``) on toy clips: one shape (circle or square) that
moves at constant speed right, left, down or up; the class is colour x direction (8 classes). The samples
are judged without any learned classifier: ``motion_direction`` reads the direction off the foreground's
centroid, frame by frame; ``colour_of`` the colour; ``score`` also checks the shape stays one shape.

What is simplified compared with the real systems (Sora, Open-Sora, Latte, CogVideoX, Movie Gen):

- **Pixels, not latents.** Real systems first compress the video with a learned spatio-temporal VAE
  (e.g. 4x in time, 8x8 in space) and patch the latents; here the 16 x 16 pixels are patched directly.
- **Fixed size.** One clip length, one resolution, one aspect ratio, so a fixed sin-cos table serves. Sora
  trains on native sizes and durations (variable token counts, packed sequences; NaViT-style) with
  learned or rotary (RoPE) positions.
- **Labels, not text.** Eight class labels through the DiT's label table; real systems condition on
  text through cross-attention or joint attention (the caption half of this lesson: ``minidit.captions``).
- **Full attention at 64 tokens.** Full spacetime attention costs O(T^2); at T = 64 it is nothing. Real
  systems meet 10^4 - 10^5 tokens, and many (Latte, Open-Sora 1.x) alternate spatial and temporal attention
  blocks to afford it; others (CogVideoX, Movie Gen) keep full 3-D attention and pay for it.
- **Scale.** 1.3 M parameters trained for minutes on a CPU, against billions of parameters on thousands
  of GPUs. Nothing here tests long-range consistency, physics or image-to-video.

Command line::

    python -m minidit.video train --run-dir runs/video     # 18 min measured on a busy 2-core CPU, 1 thread
    python -m minidit.video export runs/video              # -> data/toy_video_dit.safetensors
    python -m minidit.video eval                           # the shipped model's direction/colour accuracy
    python -m minidit.video preview --out video.png        # frame strips (data, or --samples)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from . import toy
from .embed import LabelEmbedder, TimestepEmbedder, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed
from .errors import ArgumentParser, UserError, guidance_scale, positive_int, run_cli
from .flow import FlowMatching
from .model import DiT, DiTBlock, FinalLayer

# --------------------------------------------------------------------------
# Toy videos: one shape moving at constant speed
# --------------------------------------------------------------------------

DIRECTIONS = ["right", "left", "down", "up"]
#: Unit motion per direction in image coordinates (x to the right, y *down*: rows grow downwards).
DIRECTION_VECTORS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
COLOURS = list(toy.COLOURS)  # ["red", "blue"]: toy's colours
VIDEO_SHAPES = ["circle", "square"]  # drawn by toy's renderer; not part of the label
CLASS_NAMES: list[str] = [f"{colour} moving {direction}" for colour in COLOURS for direction in DIRECTIONS]
NUM_CLASSES = len(CLASS_NAMES)  # 8; class = colour_index * 4 + direction_index
RADIUS_RANGE = (0.40, 0.55)  # circumradius, in units of half the image side (3.2-4.4 px at 16 px)
TRAVEL_RANGE = (0.45, 0.70)  # distance covered from the first frame to the last (3.6-5.6 px at 16 px)


def video_params(indices: torch.Tensor, seed: int = 0, frames: int = 8) -> dict[str, torch.Tensor]:
    """The random parameters of videos ``indices`` (int64 [N]), from toy's counter-based generator.

    Returns ``label`` int64 [N], ``direction`` int64 [N] (index into ``DIRECTIONS``), ``colour_index`` int64
    [N], ``shape`` int64 [N] (index into ``VIDEO_SHAPES``), ``radius`` [N], ``colour`` [N, 3] (RGB in [0, 1],
    jittered as toy's), and ``centres`` [N, F, 2]: the (x, y) centre in each frame, image units ([-1, 1]).
    The start is placed so that the shape stays inside every frame, ``toy.MARGIN`` from the border.
    """
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    words = toy.random_words(indices, seed, count=9)
    u = toy.uniform(words)  # [N, 9]; column k is the k-th draw of each video
    label = toy.shift_right(words[:, 0], 1) % NUM_CLASSES
    colour_index, direction = label // len(DIRECTIONS), label % len(DIRECTIONS)
    shape = (u[:, 1] * len(VIDEO_SHAPES)).long()
    radius = RADIUS_RANGE[0] + (RADIUS_RANGE[1] - RADIUS_RANGE[0]) * u[:, 2]
    travel = TRAVEL_RANGE[0] + (TRAVEL_RANGE[1] - TRAVEL_RANGE[0]) * u[:, 3]
    velocity = DIRECTION_VECTORS[direction] * travel[:, None]  # [N, 2]: first frame to last
    room = (1 - toy.MARGIN - radius)[:, None] - velocity.abs() / 2  # [N, 2]: how far the track's middle may go
    middle = (2 * u[:, 4:6] - 1) * room
    progress = torch.arange(frames, dtype=torch.float32) / (frames - 1) - 0.5  # [F], -1/2 .. 1/2
    centres = middle[:, None, :] + progress[None, :, None] * velocity[:, None, :]  # [N, F, 2]
    base = torch.tensor(list(toy.COLOURS.values()), dtype=torch.float32)[colour_index]
    colour = (base + toy.COLOUR_JITTER * (2 * u[:, 6:9] - 1)).clamp(0, 1)
    return dict(label=label, direction=direction, colour_index=colour_index, shape=shape, radius=radius,
                colour=colour, centres=centres)  # fmt: skip


def make_batch(
    indices: torch.Tensor, seed: int = 0, frames: int = 8, image_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy videos ``indices`` of data seed ``seed`` (arguments in ``minidit.toy.make_batch``'s order):
    (videos float32 [N, 3, F, S, S] in [-1, 1], labels int64 [N]).

    Video i is one shape (circle or square) of one colour moving in a straight line at constant speed in
    one of four directions; label = colour_index * 4 + direction_index (``CLASS_NAMES``). It is a pure
    function of (seed, indices[i], frames, image_size): the same in any batch, in any order. Each frame is
    drawn by ``toy.render`` (signed distance, anti-aliased over one pixel, toy's dark background).
    """
    indices = toy.as_indices(indices)
    params = video_params(indices, seed, frames)
    n = len(indices)
    per_frame = {  # one toy.render "image" per (video, frame); toy draws shape label % 5 (0 circle, 1 square)
        "label": params["shape"].repeat_interleave(frames),
        "radius": params["radius"].repeat_interleave(frames),
        "centre": params["centres"].reshape(n * frames, 2),
        "rotation": torch.tensor([[1.0, 0.0]]).expand(n * frames, 2),
        "colour": params["colour"].repeat_interleave(frames, dim=0),
    }
    images = toy.render(per_frame, image_size)  # [N*F, 3, S, S]
    return rearrange(images, "(n f) c h w -> n c f h w", n=n, f=frames), params["label"]


# --------------------------------------------------------------------------
# Spacetime patches
# --------------------------------------------------------------------------


def patchify_spacetime(x: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    """Cut videos into non-overlapping tubelets of pt frames x p x p pixels, one token per tubelet.

    x: [B, C, F, H, W] -> [B, T, pt*p*p*C] with T = (F/pt)(H/p)(W/p). Tokens are **time-major**: all the
    tubelets of frames 0..pt-1 first (row by row, columns within a row, as ``embed.patchify``), then those
    of the next pt frames, ...: token (i, r, c) is at index (i * H/p + r) * W/p + c. Inside a token the
    values are laid out (frame, patch row, patch column, channel): channels *last*, as ``embed.patchify``.
    """
    B, C, F, H, W = x.shape
    if F % pt or H % p or W % p:
        raise ValueError(f"a video of {F}x{H}x{W} does not split into tubelets of {pt}x{p}x{p}")
    return rearrange(x, "b c (f t) (h p) (w q) -> b (f h w) (t p q c)", t=pt, p=p, q=p)


def unpatchify_spacetime(x: torch.Tensor, pt: int, p: int, c: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``patchify_spacetime``: [B, T, pt*p*p*c] -> [B, c, F, H, W] for a token grid
    ``grid`` = (F/pt, H/p, W/p) (time, rows, columns; T must equal their product)."""
    f, h, w = grid
    if x.shape[1] != f * h * w or x.shape[2] != pt * p * p * c:
        raise ValueError(f"tokens of shape {tuple(x.shape)} do not fit a {f}x{h}x{w} grid of {pt}x{p}x{p}x{c}")
    return rearrange(x, "b (f h w) (t p q c) -> b c (f t) (h p) (w q)", f=f, h=h, w=w, t=pt, p=p, q=p, c=c)


class SpacetimePatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d with kernel = stride = (pt, p, p), i.e. one shared Linear applied to every
    flattened tubelet. x: [B, C, F, H, W] -> [B, T, D], tokens in ``patchify_spacetime``'s order.

    The Linear on ``patchify_spacetime(x, pt, p)`` with weight ``proj.weight.permute(0, 2, 3, 4, 1).reshape(D, -1)``
    (the Conv3d weight [D, C, pt, p, p] laid out channels last) and bias ``proj.bias`` gives the same tokens.
    """

    def __init__(self, frames: int, image_size: int, tubelet: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if frames % tubelet or image_size % patch_size:
            raise ValueError(
                f"{frames}x{image_size}x{image_size} does not split into {tubelet}x{patch_size}x{patch_size}"
            )
        self.frames, self.image_size, self.tubelet, self.patch_size = frames, image_size, tubelet, patch_size
        self.grid = (frames // tubelet, image_size // patch_size, image_size // patch_size)  # (time, rows, cols)
        self.num_patches = math.prod(self.grid)
        kernel = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.frames, self.image_size, self.image_size)
        if tuple(x.shape[-3:]) != expected:
            raise ValueError(f"expected videos of {expected} (frames, height, width), got {tuple(x.shape[-3:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, f, h, w] -> [B, T, D], time-major


def get_3d_sincos_pos_embed(embed_dim: int, grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 3-D sin-cos position table for a grid_t x grid_h x grid_w token grid -> [T, embed_dim] (float64).

    Tokens in ``patchify_spacetime``'s order (time-major). The channels are split as MAE-ST (Feichtenhofer et al.
    2022) splits them: the first D/4 encode the token's *time* index (``embed.get_1d_sincos_pos_embed``), the last
    3D/4 its position in the frame (``embed.get_2d_sincos_pos_embed``: columns, then rows). So every token of one
    tubelet column shares the spatial part, and every token of one time step the temporal part. Needs D divisible
    by 16 and a square frame grid (grid_h == grid_w).
    """
    if embed_dim % 16:
        raise ValueError(f"embed_dim must be divisible by 16, got {embed_dim}")
    if grid_h != grid_w:
        raise ValueError(f"the spatial grid must be square, got {grid_h}x{grid_w}")
    temporal = get_1d_sincos_pos_embed(embed_dim // 4, np.arange(grid_t))  # [f, D/4]
    spatial = get_2d_sincos_pos_embed(embed_dim - embed_dim // 4, grid_h)  # [h*w, 3D/4]
    return np.concatenate(
        [np.repeat(temporal, grid_h * grid_w, axis=0), np.tile(spatial, (grid_t, 1))], axis=1
    )  # token (i, r, c) at index i*h*w + r*w + c


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


class VideoDiT(nn.Module):
    """A class-conditional DiT on spacetime patches. forward(x [B, 3, F, S, S], t [B], y [B]) -> [B, 3, F, S, S].

    The image DiT with its 2-D patch embedding and position table swapped for ``SpacetimePatchEmbed`` and
    ``get_3d_sincos_pos_embed``; everything else is ``model.DiT``'s own parts: ``TimestepEmbedder``,
    ``LabelEmbedder`` (label dropout ``class_dropout_prob`` for CFG; null label = ``num_classes``), ``DiTBlock``
    (adaLN-Zero, full self-attention over all T tokens of the clip), ``FinalLayer`` and the same initialisation.
    The output is the flow-matching velocity (no learned variance). ``FinalLayer(hidden, p, tubelet * C)``
    regresses p*p*(pt*C) = pt*p*p*C values per token, read in ``patchify_spacetime``'s token layout.
    """

    def __init__(
        self,
        frames: int = 8,
        image_size: int = 16,
        tubelet: int = 2,
        patch_size: int = 4,
        in_channels: int = 3,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        self.frames, self.image_size, self.tubelet, self.patch_size = frames, image_size, tubelet, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.x_embedder = SpacetimePatchEmbed(frames, image_size, tubelet, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, tubelet * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """``DiT.initialize_weights``'s recipe: Xavier-uniform Linears (zero bias), the fixed sin-cos table, Xavier
        on the patch embedding seen as a Linear, N(0, 0.02) label table and timestep MLP, and adaLN-Zero: every
        adaLN regressor and the output Linear at zero, so a fresh model outputs 0 and each block is the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        table = get_3d_sincos_pos_embed(self.hidden_size, *self.x_embedder.grid)
        self.pos_embed.data.copy_(torch.from_numpy(table).float()[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        for weight in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight,
                       self.t_embedder.mlp[2].weight):  # fmt: skip
            nn.init.normal_(weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in zeroed + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        """The shape of one clip (and of its noise): (C, F, S, S)."""
        return (self.in_channels, self.frames, self.image_size, self.image_size)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, F, S, S] noisy videos, t: [B] (1000 * flow time), y: [B] labels -> [B, C, F, S, S]."""
        x = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [B, D]
        for block in self.blocks:
            x = block(x, c)  # full spacetime attention: every token sees all T
        x = self.final_layer(x, c)  # [B, T, pt*p*p*C]
        return unpatchify_spacetime(x, self.tubelet, self.patch_size, self.out_channels, self.x_embedder.grid)

    #: Classifier-free guidance in one batched pass: ``DiT.forward_with_cfg`` itself (it only needs ``forward``,
    #: ``in_channels`` and a batch of [x, x] with labels [y, null]). Pass ``guided_channels=None`` (a velocity).
    forward_with_cfg = DiT.forward_with_cfg


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def generate(
    model: VideoDiT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    num_steps: int = 25,
    seed: int = 0,
    indices: torch.Tensor | None = None,
    batch_size: int = 100,
    progress: bool = False,
) -> torch.Tensor:
    """Videos of classes ``labels`` [N]: [N, C, F, S, S] in [-1, 1], by the image sampler
    (``minidit.sample.generate`` with ``objective="flow"``): Euler on the flow-matching ODE from t = 1 to 0 over
    ``num_steps`` steps, x0_hat clipped to [-1, 1] (a pixel-space model), classifier-free guidance on all
    channels (``cfg_scale`` 1: none). Video i's noise comes from ``runtime.sample_generator(seed, indices[i])``
    (default indices 0..N-1): the same video in any batch."""
    from .sample import generate as generate_samples

    labels = torch.as_tensor(labels).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise UserError(f"labels must be in 0..{model.num_classes - 1}, got {labels.tolist()}")
    if len(labels) == 0:
        return torch.empty(0, *model.sample_shape)
    with torch.no_grad():
        videos = generate_samples(
            model, labels, cfg_scale=cfg_scale, num_steps=num_steps, sampler="euler", seed=seed, objective="flow",
            clip_denoised=True, batch_size=batch_size, progress=progress, indices=indices,
        )  # fmt: skip
    return videos.clamp(-1, 1).cpu()


# --------------------------------------------------------------------------
# Measuring videos without a learned classifier
# --------------------------------------------------------------------------

_BACKGROUND = toy.BACKGROUND * 2 - 1  # toy's background in [-1, 1]
MIN_SPEED = 0.1  # pixels per frame: slower counts as standing still
FOREGROUND_THRESHOLD = 0.5  # a pixel counts as shape where its brightest channel exceeds the background by this


def foreground(videos: torch.Tensor) -> torch.Tensor:
    """How much each pixel looks like shape: [B, 3, F, H, W] -> [B, F, H, W] >= 0: its brightest channel's
    excess over toy's background, less ``FOREGROUND_THRESHOLD`` (both colours have one channel near +0.9,
    the background is -0.84 in all three), clamped at 0. Soft, so an anti-aliased edge counts in part."""
    return (videos.float().amax(dim=1) - _BACKGROUND - FOREGROUND_THRESHOLD).clamp(min=0)


def centroids(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground-weighted centre of each frame: [B, 3, F, H, W] -> (centres [B, F, 2] as (x, y) in pixels,
    x = column, y = row; mass [B, F], the foreground's total weight; spread [B, F], its RMS distance from the
    centre in pixels: about 2 for a toy shape, 6.5 for noise over a 16 x 16 frame). Empty frames get the
    frame's middle and spread 0."""
    w = foreground(videos)  # [B, F, H, W]
    H, W = w.shape[-2:]
    mass = w.sum(dim=(2, 3))
    safe = mass.clamp(min=1e-6)
    cols, rows = torch.arange(W, dtype=w.dtype), torch.arange(H, dtype=w.dtype)
    x = (w.sum(dim=2) * cols).sum(-1) / safe
    y = (w.sum(dim=3) * rows).sum(-1) / safe
    empty = mass <= 1e-6
    x, y = x.masked_fill(empty, (W - 1) / 2), y.masked_fill(empty, (H - 1) / 2)
    d2 = (cols - x[..., None, None]) ** 2 + (rows[:, None] - y[..., None, None]) ** 2  # [B, F, H, W]
    spread = ((w * d2).sum(dim=(2, 3)) / safe).sqrt()
    return torch.stack([x, y], dim=-1), mass, spread


def motion_velocity(videos: torch.Tensor) -> torch.Tensor:
    """The foreground centroid's velocity, least squares over the frames: [B, 3, F, H, W] -> [B, 2] (x, y) in
    pixels per frame (x to the right, y down)."""
    c = centroids(videos)[0]  # [B, F, 2]
    f = torch.arange(c.shape[1], dtype=c.dtype)
    f = f - f.mean()
    return (f[None, :, None] * (c - c.mean(dim=1, keepdim=True))).sum(1) / (f * f).sum()


def motion_direction(videos: torch.Tensor, min_speed: float = MIN_SPEED) -> torch.Tensor:
    """Which way the shape moves: [B, 3, F, H, W] -> int64 [B], an index into ``DIRECTIONS`` (right, left,
    down, up): the direction closest to the centroid's velocity (``motion_velocity``), or -1 ("still") when
    it moves less than ``min_speed`` pixels per frame (toy clips move 0.57 - 0.96 px per frame at 16 px)."""
    v = motion_velocity(videos)
    direction = (v @ DIRECTION_VECTORS.T).argmax(dim=1)
    return direction.masked_fill(v.norm(dim=1) < min_speed, -1)


def colour_of(videos: torch.Tensor) -> torch.Tensor:
    """The shape's colour: [B, 3, F, H, W] -> int64 [B], an index into ``COLOURS`` (0 red, 1 blue): whether the
    foreground-weighted mean of red or of blue is higher (background pixels carry no weight)."""
    w = foreground(videos)[:, None]  # [B, 1, F, H, W]
    mean = (videos.float() * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp(min=1e-6)  # [B, 3]
    return (mean[:, 2] > mean[:, 0]).long()


def area_stability(videos: torch.Tensor) -> torch.Tensor:
    """How steady the shape's size is over the frames: [B, 3, F, H, W] -> [B], the smallest frame's foreground
    mass over the largest's (1: the same in every frame, as in real clips; 0: the shape vanishes somewhere)."""
    mass = centroids(videos)[1]
    return mass.amin(dim=1) / mass.amax(dim=1).clamp(min=1e-6)


def score(videos: torch.Tensor, labels: torch.Tensor, min_stability: float = 0.7, max_spread: float = 0.25) -> dict:
    """How many videos show what was asked: videos [B, 3, F, H, W] in [-1, 1], labels [B] -> a dict of
    ``direction`` (fraction moving the asked way), ``colour`` (fraction of the asked colour), ``both``,
    ``coherent`` (fraction that look like one moving shape: in every frame the foreground mass is at least
    ``min_stability`` of its largest, so nothing fades in or out, and its RMS spread around the centroid is at
    most ``max_spread`` of the frame side, so it is one compact blob, not a smear or two shapes), ``stability``
    (mean ``area_stability``), ``speed`` (mean centroid speed, pixels per frame) and ``n``."""
    labels = torch.as_tensor(labels).long()
    direction_ok = motion_direction(videos) == labels % len(DIRECTIONS)
    colour_ok = colour_of(videos) == labels // len(DIRECTIONS)
    stability = area_stability(videos)
    compact = centroids(videos)[2].amax(dim=1) <= max_spread * videos.shape[-1]
    coherent = (stability >= min_stability) & compact
    return {
        "direction": direction_ok.float().mean().item(),
        "colour": colour_ok.float().mean().item(),
        "both": (direction_ok & colour_ok).float().mean().item(),
        "coherent": coherent.float().mean().item(),
        "stability": stability.mean().item(),
        "speed": motion_velocity(videos).norm(dim=1).mean().item(),
        "n": len(labels),
    }


# --------------------------------------------------------------------------
# Training (python -m minidit.video train)
# --------------------------------------------------------------------------

DEFAULT_VIDEO_DIT = toy.DEFAULT_CLASSIFIER.parent / "toy_video_dit.safetensors"
#: How data/toy_video_dit.safetensors is made; data/README.md and benchmarks/results/video-2026-12-01.md record the run.
VIDEO_COMMAND = (
    "OMP_NUM_THREADS=1 python -m minidit.video train --run-dir runs/video && python -m minidit.video export runs/video"
)

#: The training recipe (``train --help`` shows each): the model's arguments, then the optimisation.
DEFAULTS = dict(
    frames=8, image_size=16, tubelet=2, patch_size=4, hidden_size=128, depth=4, num_heads=4,
    class_dropout_prob=0.1, steps=3000, batch_size=32, lr=2e-3, warmup_steps=100, ema_decay=0.995,
    seed=0, data_seed=0, save_every=100, log_every=25,
)  # fmt: skip
MODEL_KEYS = (
    "frames",
    "image_size",
    "tubelet",
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "class_dropout_prob",
)


def build_model(cfg: dict) -> VideoDiT:
    """A fresh ``VideoDiT`` of run config ``cfg``, its initial weights drawn from ``cfg["seed"]`` (the caller's
    global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        return VideoDiT(**{k: cfg[k] for k in MODEL_KEYS}, num_classes=NUM_CLASSES)


def train_step(model: VideoDiT, ema: VideoDiT, opt: torch.optim.Optimizer, flow: FlowMatching, cfg: dict, step: int):
    """One optimizer step of the flow-matching loss on videos ``step * B ... (step + 1) * B - 1`` (every video is
    new): the image trainer's own step (``minidit.train.train_step``: AdamW, then the EMA). Every random number
    comes from ``runtime.step_generator(seed, step)``, in the image trainer's order (t, then the noise, then the
    label drops), so a resumed run draws what an uninterrupted one draws. Returns the loss (float)."""
    from . import train
    from .runtime import step_generator

    B = cfg["batch_size"]
    x, y = make_batch(torch.arange(step * B, (step + 1) * B), cfg["data_seed"], cfg["frames"], cfg["image_size"])
    g = step_generator(cfg["seed"], step)
    t = flow.sample_timesteps(B, g)
    noise = torch.randn(x.shape, generator=g)
    drop = (torch.rand(B, generator=g) < cfg["class_dropout_prob"]).long()
    lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))  # linear warm-up, then constant
    sums = train.train_step(
        model, model, ema, opt, flow, [(x, y, t, noise, drop)], accum=1, lr=lr, ema_decay=cfg["ema_decay"]
    )
    return sums[0].item() / B


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def train(run_dir: str | os.PathLike, **overrides) -> dict:
    """Train a ``VideoDiT`` on toy videos into ``run_dir`` (``config.json``, ``log.jsonl``,
    ``checkpoints/last.pt`` with model, EMA, optimizer and step, written atomically every ``save_every`` steps).
    Running it again continues from the checkpoint; a run directory of another config is refused, and so is one
    that another trainer is writing (``rundir.lock``, as ``python -m minidit.train``).
    Returns ``{"step", "seconds", "videos_per_s", "loss"}`` (``seconds``: this invocation's wall time)."""
    from .rundir import lock, make_writable_dir, unlock

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    run_dir = Path(run_dir)
    fd = lock(run_dir)
    try:
        make_writable_dir(run_dir / "checkpoints")
        return _train_locked(run_dir, {**DEFAULTS, **overrides})
    finally:
        unlock(fd)


def _train_locked(run_dir: Path, cfg: dict) -> dict:
    import copy

    from tqdm import tqdm

    from .checkpoint import CheckpointError, read_file, save_checkpoint
    from .fileio import read_json, write_json
    from .train import make_optimizer

    if (run_dir / "config.json").is_file():
        old = read_json(run_dir / "config.json")
        diff = {k: (old.get(k), v) for k, v in cfg.items() if k not in ("steps", "save_every", "log_every")
                and old.get(k) != v}  # fmt: skip
        if diff:
            k, (was, now) = next(iter(diff.items()))
            raise UserError(f"{run_dir} belongs to a different video run ({k}: {was} there, {now} here)")
    write_json(run_dir / "config.json", cfg)

    model = build_model(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg["lr"], 0.0, torch.device("cpu"))
    flow, step = FlowMatching(), 0
    ckpt = _checkpoint_path(run_dir)
    if ckpt.is_file():
        try:
            state = read_file(ckpt)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            step = int(state["step"])
        except (CheckpointError, KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{ckpt} cannot be resumed ({str(e).splitlines()[0]}); it is left in place") from None
    model.train()

    def save(at: int) -> None:
        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": at, "config": cfg}, ckpt)  # fmt: skip

    start, done, losses = time.perf_counter(), 0, []
    bar = tqdm(range(step, cfg["steps"]), initial=step, total=cfg["steps"], desc="train video DiT", unit="step")
    with open(run_dir / "log.jsonl", "a") as log:
        for s in bar:
            losses.append(train_step(model, ema, opt, flow, cfg, s))
            done += 1
            if not math.isfinite(losses[-1]):
                raise UserError(f"the loss is {losses[-1]} at step {s}: stopped; the last good checkpoint is kept")
            if (s + 1) % cfg["log_every"] == 0 or s + 1 == cfg["steps"]:
                rate = done * cfg["batch_size"] / (time.perf_counter() - start)
                recent = sum(losses[-cfg["log_every"] :]) / len(losses[-cfg["log_every"] :])
                log.write(json.dumps({"step": s + 1, "loss": recent, "videos_per_s": rate}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{recent:.4f}", vid_s=f"{rate:.0f}")
            if (s + 1) % cfg["save_every"] == 0 or s + 1 == cfg["steps"]:
                save(s + 1)
    bar.close()
    seconds = time.perf_counter() - start
    return {"step": max(step, cfg["steps"]), "seconds": seconds, "loss": losses[-1] if losses else None,
            "videos_per_s": done * cfg["batch_size"] / seconds if done else None}  # fmt: skip


# --------------------------------------------------------------------------
# The shipped checkpoint
# --------------------------------------------------------------------------


def export_video_dit(run_dir: str | os.PathLike, out: str | os.PathLike = DEFAULT_VIDEO_DIT) -> Path:
    """Write the EMA weights of a video run to a small safetensors file: fp16 weights (the fixed ``pos_embed``
    stays fp32), with the model's arguments, the run's config, class names and step in the metadata."""
    from safetensors.torch import save_file

    from .checkpoint import CheckpointError, read_file
    from .fileio import atomic_write

    ckpt = _checkpoint_path(Path(run_dir))
    try:
        state = read_file(ckpt)
        ema, cfg, step = state["ema"], state["config"], int(state["step"])
        missing = [k for k in MODEL_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"its config has no {', '.join(missing)}: a run of another trainer?")
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{run_dir}: not a video run directory ({str(e).splitlines()[0]})") from None
    tensors = {k: (v.float() if k == "pos_embed" else v.half()).contiguous() for k, v in ema.items()}
    model_args = {**{k: cfg[k] for k in MODEL_KEYS}, "num_classes": NUM_CLASSES}
    info = {
        "format": "minidit toy video DiT",
        "model": json.dumps(model_args, sort_keys=True),
        "config": json.dumps(cfg, sort_keys=True),
        "class_names": json.dumps(CLASS_NAMES),
        "step": str(step),
    }
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=info))
    return Path(out)


def load_video_dit(path: str | os.PathLike | None = None) -> tuple[VideoDiT, dict]:
    """The shipped toy video DiT (default ``data/toy_video_dit.safetensors``), float32 in eval mode, loaded with
    ``strict=True``, and its run config (``config["frames"]``, ``config["class_names"]``, ``config["step"]``, ...).
    Sample it with ``generate(model, labels, cfg_scale=4)``. A missing file raises ``UserError`` naming the
    command that makes it."""
    from safetensors import safe_open

    from .checkpoint import CheckpointError, read_file

    path = Path(path) if path is not None else DEFAULT_VIDEO_DIT
    if not path.is_file():
        raise UserError(
            f"no toy video DiT at {path}: make one with `{VIDEO_COMMAND}` (18 minutes on a busy 2-core CPU)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
        if info.get("format") != "minidit toy video DiT":
            raise CheckpointError("not written by `python -m minidit.video export`")
        model_args, cfg = json.loads(info["model"]), json.loads(info["config"])
        sd = read_file(path)
        model = VideoDiT(**model_args)
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a toy video DiT file ({str(e).splitlines()[0]}): make one with "
                        f"`{VIDEO_COMMAND}`") from None  # fmt: skip
    step = int(info["step"]) if info.get("step", "").isdigit() else None
    return model.eval(), {**cfg, "class_names": json.loads(info.get("class_names", "null")) or CLASS_NAMES,
                          "step": step}  # fmt: skip


# --------------------------------------------------------------------------
# Evaluation and previews
# --------------------------------------------------------------------------


def balanced_labels(n: int) -> torch.Tensor:
    """n labels cycling through the classes: 0, 1, ..., 7, 0, 1, ... -> int64 [n]."""
    return torch.arange(n) % NUM_CLASSES


def evaluate(
    model: VideoDiT,
    n: int = 200,
    cfg_scales: tuple[float, ...] = (4.0, 1.0),
    num_steps: int = 25,
    seed: int = 0,
    progress: bool = False,
) -> dict[float, dict]:
    """``score`` of ``n`` class-balanced samples (``balanced_labels``) at each guidance scale (1: unguided), the
    same noise for every scale: {scale: score dict}."""
    labels = balanced_labels(n)
    return {s: score(generate(model, labels, s, num_steps, seed, progress=progress), labels) for s in cfg_scales}


def frame_strip(videos: torch.Tensor, path: str | os.PathLike, scale: int = 4) -> None:
    """Save videos [N, 3, F, S, S] in [-1, 1] as one PNG (matplotlib): one row per video, its F frames left to
    right (``toy.save_grid``)."""
    n, _, f = videos.shape[:3]
    toy.save_grid(rearrange(videos, "n c f h w -> (n f) c h w"), path, nrow=f, scale=scale)


def preview_videos(per_class: int = 2, seed: int = 0, frames: int = 8, image_size: int = 16) -> torch.Tensor:
    """The first ``per_class`` toy videos of each class, class by class: [8 * per_class, 3, F, S, S]."""
    indices = torch.arange(per_class * NUM_CLASSES * 4)
    while True:
        videos, labels = make_batch(indices, seed, frames, image_size)
        if all((labels == k).sum() >= per_class for k in range(NUM_CLASSES)):
            return torch.cat([videos[labels == k][:per_class] for k in range(NUM_CLASSES)])
        indices = torch.arange(len(indices) * 2)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _format(result: dict) -> str:
    return (f"direction {result['direction']:.1%}, colour {result['colour']:.1%}, both {result['both']:.1%}, "
            f"coherent {result['coherent']:.1%} (area stability {result['stability']:.3f}, "
            f"speed {result['speed']:.2f} px/frame)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m minidit.video", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tr = commands.add_parser("train", help="train a video DiT on toy videos (resumes a run directory)")
    tr.add_argument("--run-dir", type=Path, default=Path("runs/video"), help="default runs/video")
    tr.add_argument("--steps", type=positive_int, default=DEFAULTS["steps"], help=f"default {DEFAULTS['steps']}")
    tr.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="initialisation and noise seed (default 0)")
    tr.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"], help="default 32")
    tr.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"peak learning rate (default {DEFAULTS['lr']:g})")
    tr.add_argument("--depth", type=positive_int, default=DEFAULTS["depth"], help="DiT blocks (default 4)")
    tr.add_argument("--hidden-size", type=positive_int, default=DEFAULTS["hidden_size"], help="default 128")

    ev = commands.add_parser("eval", help="score class-balanced samples: direction, colour, coherence")
    ev.add_argument("--ckpt", type=Path, default=None, help="default data/toy_video_dit.safetensors")
    ev.add_argument("--n", type=positive_int, default=200, help="samples per guidance scale (default 200)")
    ev.add_argument(
        "--cfg-scale", type=guidance_scale, default=4.0, help="guided scale, scored beside unguided (default 4)"
    )
    ev.add_argument("--num-steps", type=positive_int, default=25, help="Euler steps (default 25)")
    ev.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")

    ex = commands.add_parser("export", help="write a video run's EMA weights to data/toy_video_dit.safetensors")
    ex.add_argument("run_dir", type=Path, help="a run directory of `python -m minidit.video train`")
    ex.add_argument("--out", type=Path, default=DEFAULT_VIDEO_DIT, help="default data/toy_video_dit.safetensors")

    pv = commands.add_parser("preview", help="save frame strips (one row per video) of toy videos or samples")
    pv.add_argument("--out", type=Path, default=Path("video_preview.png"), help="default video_preview.png")
    pv.add_argument("--samples", action="store_true", help="samples of the shipped (or --ckpt) model, not data")
    pv.add_argument("--ckpt", type=Path, default=None, help="default data/toy_video_dit.safetensors")
    pv.add_argument("--per-class", type=positive_int, default=2, help="videos per class (default 2)")
    pv.add_argument("--cfg-scale", type=guidance_scale, default=4.0, help="guidance for --samples (default 4)")
    pv.add_argument("--seed", type=int, default=0, help="data or noise seed (default 0)")

    args = parser.parse_args(argv)
    if args.command == "train":
        overrides = dict(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                         depth=args.depth, hidden_size=args.hidden_size)  # fmt: skip
        if not (args.lr > 0 and math.isfinite(args.lr)):
            parser.error(f"--lr must be a positive number, got {args.lr}")
        if args.hidden_size % 16:  # the 3-D sin-cos table's split (D/4 time, 3D/4 space) and 4 heads
            parser.error(f"--hidden-size must be a multiple of 16, got {args.hidden_size}")
        print(f"training a video DiT on toy videos, {torch.get_num_threads()} CPU thread(s), run dir {args.run_dir}")
        result = train(args.run_dir, **overrides)
        print(f"step {result['step']}: checkpoint {_checkpoint_path(args.run_dir)}, log {args.run_dir / 'log.jsonl'}; "
              f"{result['seconds']:.0f} s here")  # fmt: skip
    elif args.command == "eval":
        model, cfg = load_video_dit(args.ckpt)
        start = time.perf_counter()
        results = evaluate(model, args.n, (args.cfg_scale, 1.0), args.num_steps, args.seed, progress=True)
        for s, result in results.items():
            print(f"{'CFG ' + format(s, 'g') if s != 1 else 'no guidance':>12}: {_format(result)}")
        print(f"{args.n} samples per scale, {args.num_steps} Euler steps, seed {args.seed}, "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    elif args.command == "export":
        if args.out.suffix != ".safetensors":
            parser.error(f"--out must end in .safetensors, got {args.out}")
        out = export_video_dit(args.run_dir, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): EMA weights of {args.run_dir}, fp16")
    else:
        if args.samples:
            model, cfg = load_video_dit(args.ckpt)
            labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
            videos = generate(model, labels, args.cfg_scale, seed=args.seed)
        else:
            videos = preview_videos(args.per_class, args.seed)
        frame_strip(videos, args.out)
        what = f"samples (CFG {args.cfg_scale:g})" if args.samples else "toy videos"
        print(f"wrote {args.out}: {what}, {args.per_class} per class in the order {', '.join(CLASS_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
