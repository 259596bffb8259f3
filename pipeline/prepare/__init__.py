"""Prepare stage: turn a data-set source into the canonical prepared file (uint8 NHWC).

The public face; the parts: ``params`` (the ``dataset`` section, ``PrepareParams``),
``sources`` (the ``DATASETS`` registry of loaders), ``folders`` (image folders and tars),
``images`` (one image file: Pillow's modes by rule), ``checks`` (``check_data``, the log line).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import Prepared, save_prepared
from pipeline.prepare.checks import check_data, summary_line
from pipeline.prepare.folders import IMAGE_SUFFIXES, load_imagefolder
from pipeline.prepare.images import (
    IMAGE_MODES,
    _decode,  # noqa: F401  (tests decode one file with it)
    to_grey_or_rgb,
)
from pipeline.prepare.params import DOWNLOADABLE, PrepareParams, SyntheticParams, _require_root
from pipeline.prepare.sources import (
    DATASETS,
    load_digits,
    load_npz,
    load_stl10,
    load_svhn,
    load_synthetic,
)

__all__ = [
    "DATASETS", "DOWNLOADABLE", "IMAGE_MODES", "IMAGE_SUFFIXES", "PrepareParams",
    "SyntheticParams", "check_data", "check_source", "load_digits", "load_imagefolder",
    "load_npz", "load_stl10", "load_svhn", "load_synthetic", "prepare", "summary_line",
    "to_grey_or_rgb",
]


def _subsample(data: Prepared, split: str, limit: int | None, seed: int) -> Prepared:
    mask = data.split == split
    if limit is None or mask.sum() <= limit:
        return data
    rng = np.random.default_rng(seed)
    drop = rng.permutation(np.flatnonzero(mask))[limit:]
    keep = np.ones(len(data.ids), dtype=bool)
    keep[drop] = False
    return Prepared(data.images[keep], data.labels[keep], data.split[keep], data.ids[keep],
                    data.classes, data.paths[keep])


def check_source(p: PrepareParams) -> None:
    """Cheap checks run before any job: a known name and an existing root."""
    if p.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise PipelineError(f"unknown dataset.name {p.name!r}; known: {known}")
    if p.name not in ("digits", "synthetic"):
        _require_root(p)


def prepare(params: PrepareParams, out: str | Path) -> Prepared:
    """Load ``params.name`` from its source, subsample if asked, check and write ``out``."""
    check_source(params)
    data = DATASETS[params.name](params)
    data = _subsample(data, "train", params.max_train, params.seed)
    data = _subsample(data, "test", params.max_test, params.seed + 1)
    data.check()
    save_prepared(out, data)
    print(summary_line(data), file=sys.stderr)
    return data
