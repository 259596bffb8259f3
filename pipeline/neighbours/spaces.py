"""What a neighbour search runs on: the training images and their vectors in one space."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.features import PixelMatrix, align, pixel_features
from pipeline.io import TRAINING_SPLITS, Prepared, is_prepared, load_prepared, read_latents


def training_images(data: str | Path, k: int) -> tuple[Prepared, Prepared]:
    """The prepared set ``data``, checked, and its training images, at least ``k`` + 1 (their
    images a :class:`~pipeline.io.RowView`, read only where indexed: the grid's few)."""
    prepared = load_prepared(data)
    prepared.check()
    train = prepared.view(*TRAINING_SPLITS)
    n = len(train.ids)
    if k >= n:
        raise PipelineError(
            f"neighbours.k = {k} must be less than the number of training images ({n}) in {data}"
        )
    return prepared, train


def load_source(source: Path, data: Prepared
                ) -> tuple[np.ndarray | PixelMatrix, str, dict[str, str]]:
    """Vectors of the training images of ``data``, in its order; plus space name and metadata.

    ``source`` is a latent export (``.parquet``: its vectors, in memory) or the prepared set
    itself (its folder: raw pixels flattened to float32 in [0, 1], a
    :class:`~pipeline.features.PixelMatrix` read a chunk at a time).

    Returns:
        x: (N_train, d) float32; space: latent model name or ``pixels``; metadata of the source.
    """
    source = Path(source)
    if is_prepared(source):
        return pixel_features(data, data.rows(*TRAINING_SPLITS)), "pixels", {}
    if source.suffix != ".parquet":
        raise PipelineError(f"cannot read neighbours source {source}: expected .parquet or the "
                            "prepared folder")
    if not source.exists():
        raise PipelineError(f"latents not found: {source}")
    ids, x, meta = read_latents(source)
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise PipelineError(f"{source}: {bad} of {len(x)} latent rows contain NaN or infinite "
                            "values")
    # The export holds every prepared image; the search wants the training ones.
    train = np.isin(data.split, TRAINING_SPLITS)
    pos = align(ids, data.ids[train], "training", source, known=data.ids)
    return x[pos], meta.get("model", source.parent.name), meta
