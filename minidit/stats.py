"""Measured model size and compute: the paper's table of the 12 configurations, reproduced (lesson 04).

``python -m minidit.stats`` prints all twelve configurations. The numbers are
counted, not typed in: parameters by summing tensor sizes, multiply-accumulates
by running one forward pass under ``torch.utils.flop_counter.FlopCounterMode``
on the "meta" device (no memory, no arithmetic), with the explicit ("math")
attention so that both attention matmuls are counted. The paper's "Gflops" are
forward MACs per image (1 MAC = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import MODELS, DiT, create_model

#: The paper's model table (Table 1, and the Gflops of its 12 models): params (millions), forward GMACs at 256 px.
PAPER_TABLE: dict[str, tuple[float, float]] = {
    "DiT-S/8": (33.0, 0.36), "DiT-S/4": (33.0, 1.41), "DiT-S/2": (33.0, 6.06),
    "DiT-B/8": (130.5, 1.42), "DiT-B/4": (130.5, 5.56), "DiT-B/2": (130.5, 23.01),
    "DiT-L/8": (458.1, 5.01), "DiT-L/4": (458.1, 19.70), "DiT-L/2": (458.1, 80.71),
    "DiT-XL/8": (675.1, 7.39), "DiT-XL/4": (675.1, 29.05), "DiT-XL/2": (675.1, 118.64),
}  # fmt: skip


@dataclass(frozen=True)
class ModelStats:
    """Parameters (all, and trainable: ``pos_embed`` is frozen) and forward compute per image."""

    name: str
    params: int
    trainable_params: int
    tokens: int
    gmacs: float  # forward multiply-accumulates per image, in billions ("Gflops" in the paper)

    @property
    def gflops(self) -> float:
        """Forward FLOPs per image in billions (2 per MAC)."""
        return 2 * self.gmacs

    @property
    def train_gflops(self) -> float:
        """FLOPs of one training image (forward + backward ~= 3 forwards), in billions."""
        return 3 * self.gflops


def model_stats(
    model: str | DiT, input_size: int = 32, num_classes: int = 1000, batch_size: int = 1, **kwargs
) -> ModelStats:
    """Count parameters and forward MACs per image of a DiT.

    ``model`` is a name from ``MODELS`` (built on the meta device with
    ``input_size``, ``num_classes`` and ``kwargs``) or a DiT instance (measured
    on a meta copy of its configuration). Nothing is allocated: about 0.3 s for XL/2
    (the first call in a process adds 1-2 s of FlopCounterMode start-up).
    """
    if isinstance(model, DiT):
        name = f"DiT(depth={len(model.blocks)}, D={model.hidden_size}, p={model.patch_size})"
        config = dict(
            input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
            hidden_size=model.hidden_size, depth=len(model.blocks), num_heads=model.num_heads,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.hidden_size if len(model.blocks) else 4.0,
            class_dropout_prob=model.y_embedder.dropout_prob, num_classes=model.num_classes,
            learn_sigma=model.learn_sigma,
        )  # fmt: skip
        builder = DiT
    else:
        if model not in MODELS:
            raise KeyError(f"unknown model {model!r}; choose one of {list(MODELS)}")
        name, builder = model, partial(create_model, model)
        config = dict(input_size=input_size, num_classes=num_classes, **kwargs)
    with torch.device("meta"):
        net = builder(**config, attn_backend="math").eval()
        x = torch.empty(batch_size, net.in_channels, net.input_size, net.input_size)
        t = torch.zeros(batch_size, dtype=torch.long)
        y = torch.zeros(batch_size, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x, t, y)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    macs = counter.get_total_flops() / 2 / batch_size
    return ModelStats(name, params, trainable, net.x_embedder.num_patches, macs / 1e9)


def zoo_table(input_size: int = 32) -> list[tuple[ModelStats, tuple[float, float] | None]]:
    """Measured stats of all 12 configs, each with the paper's (params M, GMACs) where it applies."""
    rows = []
    for size in ("S", "B", "L", "XL"):
        for p in (8, 4, 2):
            name = f"DiT-{size}/{p}"
            rows.append((model_stats(name, input_size=input_size), PAPER_TABLE[name] if input_size == 32 else None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidit.stats", description="Measure params and forward Gflops (MACs) of the DiT zoo."
    )
    parser.add_argument(
        "--image-size", type=int, default=256, choices=(256, 512), help="image size (latent = size / 8)"
    )
    args = parser.parse_args(argv)
    input_size = args.image_size // 8
    print(f"DiT model zoo at {args.image_size}x{args.image_size} (latent {input_size}x{input_size}x4), measured:")
    header = f"{'model':<10}{'params':>14}{'tokens':>8}{'Gflops':>10}{'paper':>9}{'diff':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for s, paper in zoo_table(input_size):
        line = f"{s.name:<10}{s.params:>14,}{s.tokens:>8}{s.gmacs:>10.2f}"
        if paper is not None:
            diff = s.gmacs / paper[1] - 1
            worst = max(worst, abs(diff))
            line += f"{paper[1]:>9.2f}{diff:>+8.2%}"
        print(line)
    print("Gflops = forward multiply-accumulates per image, as in the paper; a training image costs ~6x that in FLOPs.")
    if args.image_size == 256:
        print(f"Largest deviation from the paper's table: {worst:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
