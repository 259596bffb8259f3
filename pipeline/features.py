"""Vectors of prepared images the probes and neighbour searches read: raw pixels, latent exports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline import io as _io  # CHUNK read at call time: tests shrink it
from pipeline.io import Prepared, RowView, locate, read_latents


class PixelMatrix:
    """Raw pixels of rows of uint8 (N, H, W, C) images as an (n, H*W*C) float32 matrix in
    [0, 1], unstandardised, read from disk and converted only where indexed.

    The bounded-memory stand-in for ``images[rows].reshape(n, -1) / 255``: indexing it with a
    slice or integer rows returns that float32 block (a copy); :func:`select` narrows it to
    some of its rows without reading any; :func:`blocks` walks it a chunk at a time.
    """

    def __init__(self, images: np.ndarray | RowView, rows: np.ndarray | None = None):
        if isinstance(images, RowView):  # flatten a view of a view onto the memory map
            rows = images.rows if rows is None else images.rows[rows]
            images = images.array
        self.images = images
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, np.int64)
        self._view = RowView(images, self.rows)
        self.shape = (len(self.rows), int(np.prod(images.shape[1:], dtype=np.int64)))
        self.dtype, self.ndim = np.dtype(np.float32), 2

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        block = self._view[key]
        if block.ndim == len(self.images.shape) - 1:  # one row
            return block.reshape(-1).astype(np.float32) / 255.0
        return block.reshape(len(block), -1).astype(np.float32) / 255.0


def pixel_features(data: Prepared, rows: np.ndarray | None = None) -> PixelMatrix:
    """Raw pixels of the images of ``data`` (or of its rows ``rows``), flattened and scaled to
    [0, 1], unstandardised: an (N, H*W*C) float32 matrix read a block at a time."""
    return PixelMatrix(data.images, rows)


Features = np.ndarray | PixelMatrix  # (N, D): in memory, or pixels read where indexed


def select(x: Features, rows: np.ndarray) -> Features:
    """Rows ``rows`` (positions or a boolean mask) of a feature matrix; pixels stay unread."""
    if isinstance(x, PixelMatrix):
        return PixelMatrix(x.images, x.rows[rows])
    return x[rows]


def blocks(x: Features, chunk: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows start..start + len(block))`` of a feature matrix, ``chunk`` rows at a
    time (``pipeline.io.CHUNK`` by default): views of an array, float32 reads of pixels."""
    chunk = chunk or _io.CHUNK
    for start in range(0, len(x), chunk):
        yield start, x[start:start + chunk]


def gather(x: Features, rows: np.ndarray | None = None, chunk: int | None = None) -> np.ndarray:
    """Rows ``rows`` (all when None) of a feature matrix in memory, (len(rows), D): an array's
    own (not copied when all), pixels as float32 read ``chunk`` rows at a time. For the
    callers that need them whole: a PCA fit, a probe below its size threshold."""
    if isinstance(x, np.ndarray):
        return x if rows is None else x[rows]
    n, chunk = (len(x) if rows is None else len(rows)), chunk or _io.CHUNK
    out = np.empty((n, x.shape[1]), np.float32)
    for start in range(0, n, chunk):
        out[start:start + chunk] = x[slice(start, start + chunk) if rows is None
                                     else rows[start:start + chunk]]
    return out


def align(ids_table: np.ndarray, ids_wanted: np.ndarray, what: str, path: str | os.PathLike,
          known: np.ndarray | None = None) -> np.ndarray:
    """Positions in a table's ids of the ids the caller wants, in the caller's order.

    Args:
        ids_table: (T,) int64 ids of the table's rows, any order.
        ids_wanted: (M,) int64 ids the caller wants rows for (the prepared data's, or a
            subset of them such as the training ids).
        what: which ids ``ids_wanted`` are, as the message names them (``"training"``).
        path: the table's file, named in the message.
        known: (P,) every id the table may hold; ``ids_wanted`` when None.

    Returns:
        (M,) int64 row positions: ``ids_table[pos] == ids_wanted``.

    Raises:
        PipelineError: a wanted id missing, a table id not in ``known``, or a duplicated id.
    """
    known = ids_wanted if known is None else known
    pos, found = locate(ids_table, ids_wanted)
    unknown = np.setdiff1d(ids_table, known).size
    duplicated = len(ids_table) - len(np.unique(ids_table))
    if not found.all() or unknown or duplicated:
        raise PipelineError(
            f"{path}: ids do not match the prepared data set ({int((~found).sum())} {what} "
            f"ids missing, {unknown} ids unknown, {duplicated} duplicated)"
        )
    return pos


def latent_features(path: str | Path, data: Prepared) -> tuple[np.ndarray, dict]:
    """Latent vectors of every image of ``data`` from a ``latents.parquet``, plus its metadata.

    Returns:
        (N, d) float32 in ``data`` order; the file's metadata.
    """
    ids, vectors, meta = read_latents(path)
    return vectors[align(ids, data.ids, "prepared", path)], meta
