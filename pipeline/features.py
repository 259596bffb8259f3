"""Vectors of prepared images the probes and neighbour searches read: raw pixels, latent exports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import Prepared, locate, read_latents


def pixel_features(data: Prepared) -> np.ndarray:
    """Raw pixels of every image of ``data``, flattened and scaled to [0, 1], unstandardised.

    Returns:
        (N, H*W*C) float32, in ``data`` order.
    """
    return data.images.reshape(len(data.images), -1).astype(np.float32) / 255.0


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
