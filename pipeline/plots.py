"""Drawing helpers for the stages: image grids and loss curves (report figures: figures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def image_grid(
    rows: Sequence[np.ndarray], path: str | Path, row_labels: Sequence[str] | None = None,
    title: str = "", col_labels: Sequence[str] | None = None,
    cell_labels: Sequence[Sequence[str]] | None = None,
) -> None:
    """Save rows of images as one PNG.

    Args:
        rows: each (n, H, W, C) uint8 or float in [0, 1]; C is 1 or 3; rows may differ in n.
        path: PNG to write (atomically).
        row_labels: one label per row, shown at its left.
        col_labels: one label per column, shown above the first row.
        cell_labels: per row, one (possibly empty) label per image, shown in red under it.
    """
    plt = _pyplot()
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols + 1, 1.1 * len(rows) + 0.4),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                img = np.asarray(row[j])
                img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img
                img = np.clip(img, 0, 1)
                if img.shape[-1] == 1:
                    ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img, interpolation="nearest")
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
            if cell_labels is not None and j < len(cell_labels[i]) and cell_labels[i][j]:
                ax.set_xlabel(cell_labels[i][j], fontsize=7, color="#c00000", labelpad=1)
    if title:
        # Above the column labels, whatever the number of rows (bbox "tight" keeps it).
        height = fig.get_size_inches()[1]
        fig.subplots_adjust(top=1 - 0.3 / height)
        fig.suptitle(title, fontsize=10, y=1 + 0.05 / height, va="bottom")
    _save(fig, path)


def loss_curves(
    series: dict[str, Sequence[float]], path: str | Path, title: str = "", xlabel: str = "epoch",
    log_y: bool = False, accuracy: Sequence[float] | None = None,
) -> None:
    """Save one line per named series (e.g. total, reconstruction, KL) against its index;
    ``accuracy`` (the training's per-epoch kNN monitor) on a second axis when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        values = np.asarray(values, dtype=float)
        ax.plot(np.arange(1, len(values) + 1), values, label=name, marker="." if len(values) < 30
                else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    if accuracy is not None:
        values = np.asarray(accuracy, dtype=float)
        right = ax.twinx()
        right.plot(np.arange(1, len(values) + 1), values, color="tab:green",
                   label="kNN top-1 (held training images)")
        right.set_ylabel("kNN top-1 (held training images)", color="tab:green", fontsize=8)
        right.set_ylim(0, 1)
        right.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
