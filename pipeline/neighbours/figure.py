"""The neighbour grid: one anchor per class and its neighbours, borders coloured by label."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import Prepared

# Anchors of a grid over unlabelled images (evenly spaced; labelled: one per class).
GRID_ANCHORS = 8


def _frame(img: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """Image (H, W, C) -> RGB float with a coloured border, so label agreement shows."""
    img = img.astype(np.float32) / 255.0
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    w = max(1, img.shape[0] // 12)
    out = np.empty((img.shape[0] + 2 * w, img.shape[1] + 2 * w, 3), np.float32)
    out[:] = colour
    out[w:-w, w:-w] = img
    return out


ANCHOR, SAME, OTHER, UNKNOWN = (0.2, 0.4, 1.0), (0.1, 0.75, 0.2), (0.9, 0.1, 0.1), (0.6, 0.6, 0.6)


def grid_anchors(labels: np.ndarray, max_rows: int = 20) -> np.ndarray:
    """Row indices of the grid's anchors: the first training image of each class, in label
    order (up to ``max_rows`` classes), so every class shows and the choice is the same every
    run; evenly spaced images when no label is known."""
    known = np.flatnonzero(labels >= 0)
    if len(known) == 0:
        n = len(labels)
        return np.unique(np.linspace(0, n - 1, min(GRID_ANCHORS, n)).round().astype(int))
    _, first = np.unique(labels[known], return_index=True)  # classes in label order
    return known[first][:max_rows]


def _short(path: str, width: int = 24) -> str:
    """A file's name as a grid label: the last ``width`` characters of its path."""
    return path if len(path) <= width else "..." + path[-(width - 3):]


def neighbour_grid(train: Prepared, I_pos: np.ndarray, path: Path, title: str) -> None:
    """PNG of one anchor per class (first column, blue) and its neighbours, nearest first:
    green border = same label as the anchor, red = different (its label written under it),
    grey = unknown. Each row names its anchor's class, how many neighbours share it and,
    where the set has files, the anchor's file."""
    from pipeline.plots import image_grid

    def name(label: int) -> str:
        return train.classes[label] if 0 <= label < len(train.classes) else "?"

    rows, row_labels, cell_labels = [], [], []
    for a in grid_anchors(train.labels):
        la = int(train.labels[a])
        row, cells = [_frame(train.images[a], ANCHOR)], [""]
        for j in I_pos[a]:
            lj = int(train.labels[j])
            colour = UNKNOWN if la < 0 or lj < 0 else SAME if lj == la else OTHER
            row.append(_frame(train.images[j], colour))
            cells.append(name(lj) if colour is OTHER else "")
        rows.append(np.stack(row))
        cell_labels.append(cells)
        same = int(sum(train.labels[j] == la for j in I_pos[a])) if la >= 0 else 0
        # The anchor's file, where the set has files: a surprising row can be looked up.
        where = f"\n{_short(train.paths[a])}" if train.paths[a] else ""
        row_labels.append(f"{name(la)} ({same}/{I_pos.shape[1]}){where}")
    cols = ["anchor"] + [str(j + 1) for j in range(I_pos.shape[1])]
    image_grid(rows, path, row_labels=row_labels, col_labels=cols, title=title,
               cell_labels=cell_labels)
