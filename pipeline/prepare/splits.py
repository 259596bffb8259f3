"""Which rows a prepared set holds (the stratified held-out split and the seeded subsample,
both chosen from labels and split alone, before any pixel is read), and how many rows a
source makes or decodes at a time."""

from __future__ import annotations

import numpy as np

from pipeline.prepare.params import PrepareParams


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask holding ``test_fraction`` of every class, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test[idx[: max(1, round(test_fraction * len(idx)))]] = True
    return test


def keep_rows(split: np.ndarray, p: PrepareParams) -> np.ndarray:
    """Boolean mask of the rows kept by ``dataset.max_train`` and ``max_test``.

    Each split is subsampled on its own (train with ``seed``, test with ``seed + 1``), so the
    kept rows of one split do not depend on the other's size; unlabeled rows are all kept.
    """
    keep = np.ones(len(split), dtype=bool)
    for name, limit, seed in (("train", p.max_train, p.seed), ("test", p.max_test, p.seed + 1)):
        rows = np.flatnonzero(split == name)
        if limit is not None and len(rows) > limit:
            keep[np.random.default_rng(seed).permutation(rows)[limit:]] = False
    return keep


CHUNK_BYTES = 64 << 20  # pixels a source holds per chunk (and, reading a tar, file bytes)


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows of ``shape`` (H, W, C) uint8 made or decoded at a time: at most 1024, and at
    most ``CHUNK_BYTES`` of pixels however large the images."""
    return max(1, min(1024, CHUNK_BYTES // int(np.prod(shape))))
