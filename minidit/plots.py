"""Figures: sample grids (one row per class) and loss curves. matplotlib, no display needed."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: works headless and leaves notebook backends alone


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_class_grid(
    images: torch.Tensor | list[tuple[str, torch.Tensor]],
    row_names: list[str],
    per_row: int,
    out: str | Path,
    title: str = "",
) -> Path:
    """Save images in [-1, 1] as a grid with one labelled row per class.

    ``images`` is [R * per_row, 3, H, W], or a list of (panel title, such a tensor) drawn side by
    side (e.g. the same noise without and with guidance).
    """
    from torchvision.utils import make_grid

    panels = images if isinstance(images, list) else [("", images)]
    rows, h = len(row_names), panels[0][1].shape[-2]
    cell = 0.6 * max(h, 32) / 32  # inches per image
    fig = Figure(figsize=(1.4 + len(panels) * (0.2 + cell * per_row), 0.5 + cell * rows))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for k, (ax, (panel_title, imgs)) in enumerate(zip(axes, panels)):
        grid = make_grid(imgs.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=per_row, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        if k == 0:
            ax.set_yticks([2 + (h + 2) * i + h / 2 for i in range(rows)], row_names, fontsize=8)
        else:
            ax.set_yticks([])
        ax.set_xticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if panel_title:
            ax.set_title(panel_title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def plot_loss_curve(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Loss (and its mse / vb parts) against step from the training log's rows."""
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        if rows and key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], style, label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per dimension")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    return out
