"""Prepare stage: turn a data-set source into the prepared folder (images.npy, meta.parquet).

The public face; the parts: ``params`` (the ``dataset`` section, ``PrepareParams``),
``sources`` (the registries: ``LOADERS`` return a set in memory, ``WRITERS`` write it in
bounded memory), ``folders`` (image folders and tars), ``archive`` (strict tar reading,
shared with ``pipeline.embed``), ``images`` (one image file: Pillow's
modes by rule), ``splits`` (held-out split and subsample), ``checks`` (``check_data``, the
log line).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import Prepared, save_prepared
from pipeline.prepare.checks import check_data, summary_line
from pipeline.prepare.folders import IMAGE_SUFFIXES, write_imagefolder
from pipeline.prepare.images import (
    IMAGE_MODES,
    _decode,  # noqa: F401  (tests decode one file with it)
    to_grey_or_rgb,
)
from pipeline.prepare.params import DOWNLOADABLE, PrepareParams, SyntheticParams, _require_root
from pipeline.prepare.sources import (
    DATASETS,
    LOADERS,
    WRITERS,
    load_digits,
    load_npz,
    load_stl10,
    load_svhn,
    write_synthetic,
)
from pipeline.prepare.splits import keep_rows

__all__ = [
    "DATASETS", "DOWNLOADABLE", "IMAGE_MODES", "IMAGE_SUFFIXES", "LOADERS", "PrepareParams",
    "SyntheticParams", "WRITERS", "check_data", "check_source", "load_digits", "load_npz",
    "load_stl10", "load_svhn", "prepare", "summary_line", "to_grey_or_rgb",
    "write_imagefolder", "write_synthetic",
]


def check_source(p: PrepareParams) -> None:
    """Cheap checks run before any job: a known name and an existing root."""
    if p.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise PipelineError(f"unknown dataset.name {p.name!r}; known: {known}")
    if p.name not in ("digits", "synthetic"):
        _require_root(p)


def prepare(params: PrepareParams, out: str | os.PathLike) -> Prepared:
    """Write the prepared folder ``out`` from source ``params.name``, subsampled if asked.

    Returns:
        The set as written (images memory-mapped from ``out``).
    """
    check_source(params)
    if params.name in WRITERS:
        data = WRITERS[params.name](params, out)
    else:
        data = LOADERS[params.name](params)
        keep = keep_rows(data.split, params)
        if not keep.all():  # a copy of the images kept; none when all are
            data = Prepared(data.images[keep], data.labels[keep], data.split[keep],
                            data.ids[keep], data.classes, data.paths[keep])
        data = save_prepared(out, data)
    old = Path(out).parent / "data.npz"
    if old.is_file():  # left by an earlier version; every stage now reads the folder
        print(f"prepare: {old} is the old single-file format; wrote {out} (memory-mappable) "
              "instead; delete data.npz", file=sys.stderr)
    print(summary_line(data), file=sys.stderr)
    return data
