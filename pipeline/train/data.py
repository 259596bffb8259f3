"""What one training run reads, checked before any training: the training images, the
neighbour table of an offline source, and the fingerprints a resume compares."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.backbones import resolve_backbone
from pipeline.io import (
    TRAINING_SPLITS,
    Prepared,
    RowView,
    load_neighbours,
    load_prepared,
    locate,
)
from pipeline.train.encoder import encoder_header
from pipeline.train.grid import METHOD_USES, Run, check_support_queue, check_world
from pipeline.train.optim import OPTIMIZERS
from pipeline.train.params import TrainParams
from pipeline.train.sources import check_queue, filter_table

log = logging.getLogger("pipeline.train")


def read_neighbours(path: str | Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Neighbour table as row indices into ``ids``: (N, k) int64, the (N, k) distances in the
    same order, and the file metadata.

    Raises PipelineError when the file's ids are not exactly the training ids.
    """
    rows, nbrs, dist, meta = load_neighbours(path)
    anchor, ok_a = locate(ids, rows)
    nb, ok_n = locate(ids, nbrs)
    if len(rows) != len(ids) or not ok_a.all() or not ok_n.all() or \
            len(np.unique(rows)) != len(rows):
        raise PipelineError(
            f"neighbours file {path} is for another data set: ids do not match the "
            f"{len(ids)} training ids of the prepared data ({len(rows)} rows, "
            f"{int((~ok_a).sum()) + int((~ok_n).sum())} unknown ids)"
        )
    table_idx = np.empty_like(nb)
    table_idx[anchor] = nb
    table_dist = np.empty_like(dist)
    table_dist[anchor] = dist
    return table_idx, table_dist, meta


def fingerprint(*arrays: np.ndarray | RowView) -> str:
    """Cheap content hash for resume checks: shapes, and at most a thousand evenly spaced
    rows of each array (all ids of a few thousand images; a sample of a large image set)."""
    h = hashlib.sha1()
    for a in arrays:
        h.update(str((tuple(a.shape), a.dtype.str)).encode())
        sample = a[:: max(1, len(a) // 1000)] if len(a) else np.zeros(0)
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()


def code_fingerprint() -> str:
    """Hash of every module training imports (the files the rule lists as its code inputs):
    Snakemake re-runs the job after an edit precisely so that it trains with the new code."""
    from pipeline.codeinputs import module_files

    h = hashlib.sha1()
    for path in module_files("pipeline.train.loop"):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


@dataclass
class RunData:
    """What one training run reads, checked, before any training."""

    train: Prepared
    nb_table: np.ndarray | None
    title: str
    header: dict
    fingerprint: str
    code: str


def check_params(params: TrainParams, run: Run) -> None:
    """Validate once, before any work: method, use, source, backbone, optimiser, ranges."""
    from pipeline.schema import check_fields

    if run.method not in METHOD_USES:
        raise PipelineError(f"unknown method {run.method!r}; choose one of: "
                            f"{', '.join(METHOD_USES)}")
    if run.use not in METHOD_USES[run.method]:
        raise PipelineError(f"config key 'train.uses': {run.method} cannot take the "
                            f"{run.use!r} use; it takes {list(METHOD_USES[run.method])}")
    if (run.use == "baseline") != (run.source == ""):
        raise PipelineError(f"the {run.use!r} use needs " + (
            "no neighbour source" if run.use == "baseline" else "a neighbour source (--source)"))
    resolve_backbone(params.backbone, 32)
    if params.optimizer not in OPTIMIZERS:
        raise PipelineError(f"unknown train.optimizer {params.optimizer!r}; choose one of: "
                            f"{', '.join(OPTIMIZERS)}")
    check_fields(params)


def check_run(params: TrainParams, run: Run, data: Path,
              neighbours: Path | None) -> tuple[Prepared, str]:
    """Every check that needs only the params and the prepared set's shape (no image is
    read), so that :func:`pipeline.train.train` runs them before it starts any process.

    Returns:
        The training view of the prepared set and the resolved backbone.
    """
    check_params(params, run)
    train = load_prepared(data).view(*TRAINING_SPLITS)  # images read only when indexed
    n = len(train.images)
    if n < 2:
        raise PipelineError(f"{data}: training needs at least 2 training images, got {n}")
    _, size, width, _ = train.images.shape
    backbone = resolve_backbone(params.backbone, min(size, width))
    batch = min(params.batch_size, n)
    check_world(batch, params.processes, params.nodes)
    if run.method == "nnclr":
        check_support_queue(params.nnclr.queue_size, batch)
    if run.source == "queue":
        if neighbours is not None:
            raise PipelineError("the queue source reads no neighbours file; drop --neighbours")
        if params.filter.mutual:
            raise PipelineError("config key 'train.filter.mutual': queue neighbours change "
                                "every step, so they have no mutual table; set it to false "
                                "or drop queue from train.sources")
        check_queue(params.queue, batch, n, params.topk.k if run.use == "topk" else None)
    elif run.source and neighbours is None:
        raise PipelineError(f"the {run.source} source needs a neighbours file (--neighbours)")
    return train, backbone


def load_run(params: TrainParams, run: Run, seed: int, data: Path,
             neighbours: Path | None) -> RunData:
    train, backbone = check_run(params, run, data, neighbours)
    nb_table, title = None, run.name
    if run.source and run.source != "queue":
        nb_table, nb_dist, nb_meta = read_neighbours(neighbours, train.ids)
        if run.use == "topk" and params.topk.k - 1 > nb_table.shape[1]:
            raise PipelineError(f"config key 'train.topk.k': {params.topk.k} needs "
                                f"{params.topk.k - 1} neighbours per image, but {neighbours} "
                                f"holds {nb_table.shape[1]}; raise neighbours.k or lower it")
        nb_table = filter_table(nb_table, nb_dist, params.filter)
        kept = float((nb_table != np.arange(len(nb_table))[:, None]).mean())
        log.info("neighbours %s: k=%d metric=%s purity@1=%s, %.1f%% of pairs kept by the "
                 "filters", neighbours, nb_table.shape[1], nb_meta.get("metric", "?"),
                 nb_meta.get("purity_at_1", "?"), 100 * kept)
    prints = fingerprint(train.ids, train.images,
                         nb_table if nb_table is not None else np.zeros(0))
    header = encoder_header(backbone, train.images, asdict(params), seed)
    return RunData(train, nb_table, title, header, prints, code_fingerprint())
