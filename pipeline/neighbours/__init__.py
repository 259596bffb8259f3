"""Neighbours stage: k nearest training neighbours of every training image in one space (FAISS).

The public face: :func:`find_neighbours` writes one space's table and grid (refusing at once,
:func:`check_memory`, a search whose index would not fit), :func:`purity_table` the table over
every space. The parts: ``search`` (FAISS self-kNN, ``NeighboursParams``),
``spaces`` (the training images and their vectors), ``quality`` (purity, hubness, the purity
table and its gate), ``figure`` (the neighbour grid).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import atomic_path, code_version
from pipeline.neighbours.figure import (
    ANCHOR,
    GRID_ANCHORS,
    OTHER,
    SAME,
    UNKNOWN,
    grid_anchors,
    neighbour_grid,
)
from pipeline.neighbours.quality import (
    FLAG_COLUMNS,
    HEALTH_KEYS,
    HUB_FACTOR,
    HUB_MIN_K,
    ORPHAN_EXCESS,
    ORPHAN_MIN,
    PURITY_COLUMNS,
    PURITY_MARGIN,
    graph_stats,
    hubness,
    purity,
    purity_table,
    quality_gate,
)
from pipeline.neighbours.search import (
    BLAS_THRESHOLD,
    GPU_MAX_K,
    INDEXES,
    METRICS,
    MIN_POINTS_PER_CELL,
    Metric,
    NeighboursParams,
    _check_metric,
    available_memory,
    backend_name,
    index_bytes,
    ivf_cells,
    knn,
    prefer_fast_openblas,
    search_device,
    search_metadata,
)
from pipeline.neighbours.spaces import load_source, training_images

__all__ = [
    "ANCHOR", "BLAS_THRESHOLD", "FLAG_COLUMNS", "GPU_MAX_K", "GRID_ANCHORS", "HEALTH_KEYS",
    "HUB_FACTOR", "HUB_MIN_K", "INDEXES", "METRICS", "MIN_POINTS_PER_CELL", "Metric",
    "NeighboursParams", "ORPHAN_EXCESS", "ORPHAN_MIN", "OTHER", "PURITY_COLUMNS",
    "PURITY_MARGIN", "SAME", "UNKNOWN", "backend_name", "check_memory", "find_neighbours",
    "graph_stats", "grid_anchors", "hubness", "index_bytes", "ivf_cells", "knn", "load_source",
    "neighbour_grid", "prefer_fast_openblas", "purity", "purity_table", "quality_gate",
]


def find_neighbours(
    params: NeighboursParams, source: Path, data: Path, metric: str, out: Path, grid: Path,
    device: str,
) -> None:
    """Write ``neighbours.parquet`` (one row per training image) and its grid PNG.

    Imports torch only where the search may run on a GPU (:func:`search_device`)."""
    _check_metric(metric)
    if params.index not in INDEXES:
        raise PipelineError(f"neighbours.index: unknown index {params.index!r}; use one of: "
                            f"{', '.join(INDEXES)}")
    gpu = search_device(device, params.k)
    prepared, train = training_images(data, params.k)
    x, space, source_meta = load_source(Path(source), prepared)
    n, k = len(train.ids), params.k
    use_gpu = gpu is not None
    check_memory(space, x, params, gpu)
    backend = backend_name(params.index, use_gpu)
    print(f"{space} {metric}: {n} training vectors of dim {x.shape[1]}, k={k}, {backend}")
    t0 = time.perf_counter()
    D, I_pos = knn(x, k, metric, index=params.index, nlist=params.nlist, nprobe=params.nprobe,
                   chunk_size=params.chunk_size, use_gpu=use_gpu,
                   gpu_id=(gpu.index or 0) if use_gpu else 0)
    seconds = time.perf_counter() - t0
    stats = graph_stats(train.labels, I_pos)
    p1, pk = stats["purity_at_1"], stats["purity_at_k"]
    print(f"purity@1 {p1:.4f}, purity@{k} {pk:.4f}, hub max in-degree "
          f"{stats['hub_max_in_degree']}, orphans {stats['hub_orphan_fraction']:.4f}, "
          f"{seconds:.2f} s")
    meta = {
        **search_metadata(params, metric, n, backend),
        "space": space,
        "dataset": source_meta.get("dataset", Path(data).parent.name),
        **stats,
        "n": n,
        "dim": x.shape[1],
        "code_version": code_version(),
        "seconds": round(seconds, 4),
        "source": str(source),
        # the latent model's own health, from its export (absent for pixels and old exports)
        **{key: source_meta[key] for key in HEALTH_KEYS if key in source_meta},
    }
    _write_table(out, train.ids, I_pos, D, meta)
    title = (f"{space} / {metric}: purity@1 {p1:.2f}, purity@{k} {pk:.2f}\n"
             "border: blue anchor, green same label, red other label, grey unknown")
    neighbour_grid(train, I_pos, Path(grid), title)


def check_memory(space: str, x, params: NeighboursParams, gpu=None) -> None:
    """Refuse, in one line naming the key to change, a search whose FAISS index would not fit.

    The index holds a float32 copy of every training vector (:func:`index_bytes`): small for
    a latent space, 12.3 GB for raw pixels of 1M 32x32x3 images. Checked against the memory
    available now (the GPU's when the index goes there), so that a search that cannot fit
    fails at once rather than being killed for memory halfway.
    """
    n, d = x.shape
    lazy = not isinstance(x, np.ndarray)
    need = 4 * n * d if gpu is not None else index_bytes(n, d, params.index, params.nlist, lazy)
    free = available_memory(gpu)
    if free is None or need <= free:
        return
    fix = ("set neighbours.pixels: false to skip raw-pixel neighbours" if space == "pixels"
           else f"lower latent.dim, or drop {space} from latent.models")
    raise PipelineError(
        f"neighbours in the {space} space need {need / 2**30:.1f} GiB for the FAISS index (a "
        f"float32 copy of {n} training vectors of dimension {d}), more than the "
        f"{free / 2**30:.1f} GiB of {'GPU' if gpu is not None else 'host'} memory available; {fix}")


def _write_table(out: Path, ids: np.ndarray, I_pos: np.ndarray, D: np.ndarray,
                 meta: dict) -> None:
    """``neighbours.parquet``: id, neighbours (ids, nearest first), distances; ``meta`` as
    schema metadata.

    Args:
        ids: (N,) training ids; I_pos: (N, k) neighbour positions into them; D: (N, k).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = ids.astype(np.int64)
    k = I_pos.shape[1]
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(ids[I_pos].ravel()), k),
            "distances": pa.FixedSizeListArray.from_arrays(
                pa.array(D.ravel(), pa.float32()), k),
        }
    ).replace_schema_metadata({key: str(v).encode() for key, v in meta.items()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
