"""Figures for people and the Snakemake report: image grids, loss curves, accuracy chart."""

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
) -> None:
    """Save rows of images as one PNG.

    Args:
        rows: each (n, H, W, C) uint8 or float in [0, 1]; C is 1 or 3; rows may differ in n.
        path: PNG to write (atomically).
        row_labels: one label per row, shown at its left.
        col_labels: one label per column, shown above the first row.
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
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def loss_curves(
    series: dict[str, Sequence[float]], path: str | Path, title: str = "", xlabel: str = "epoch",
    log_y: bool = False,
) -> None:
    """Save one line per named series (e.g. total, reconstruction, KL) against its index."""
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
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def accuracy_chart(table: str | Path, path: str | Path) -> None:
    """Horizontal bars of linear-probe top-1 per run, mean +- std over seeds."""
    import pandas as pd

    from pipeline.aggregate import summarise

    df = pd.read_csv(table)
    summary = summarise(df)
    colours = {"pixels": "#888888", "latent": "#4c72b0", "byol": "#dd8452"}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(summary) + 1.2))
    labels = [f"{r.run}" + (f" (n={r.seeds})" if r.seeds > 1 else "") for r in summary.itertuples()]
    y = np.arange(len(summary))[::-1]
    ax.barh(y, summary["top1_mean"], xerr=summary["top1_std"], capsize=3,
            color=[colours.get(s, "#55a868") for s in summary["stage"]])
    for yi, m in zip(y, summary["top1_mean"], strict=True):
        ax.text(m + 0.005, yi, f"{m:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("linear-probe top-1 (mean ± std over seeds)")
    lo = max(0.0, float(summary["top1_mean"].min()) - 0.1)
    ax.set_xlim(lo, 1.07)  # room for the value labels
    ax.set_title(", ".join(sorted(df["dataset"].astype(str).unique())), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
