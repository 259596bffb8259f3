"""Self-kNN with FAISS: metrics, exact or IVF index, chunked queries, on the GPU or the CPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline import PipelineError

# Query count from which FAISS computes distances as one BLAS matrix product; faiss 1.15
# defaults to 128000, but its blocked sgemm path is 1.4-2.7x faster here for any chunk.
BLAS_THRESHOLD = 20
# FAISS GPU k-selection handles at most this many results per query.
GPU_MAX_K = 2048
# FAISS k-means wants at least this many training points per IVF cell.
MIN_POINTS_PER_CELL = 39


def prefer_fast_openblas() -> None:
    """Tell a not-yet-loaded OpenBLAS which kernels this CPU supports, when it cannot tell.

    The faiss-cpu wheel bundles OpenBLAS 0.3.15, which does not know recent Xeons and falls
    back to its generic Prescott (SSE3) kernels: a 2-3x slower exact search (measured, see
    docs/BENCHMARKS.md). Only takes effect when called before the first ``import faiss``;
    a user's own OPENBLAS_CORETYPE wins; a no-op off Linux and on CPUs without AVX2.
    """
    if "OPENBLAS_CORETYPE" in os.environ or "faiss" in sys.modules:
        return
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith("flags")), [])
    except OSError:
        return
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


prefer_fast_openblas()


@dataclass
class NeighboursParams:
    """The ``neighbours`` config section (metrics and pixels are grid keys, not params)."""

    k: int = 5
    index: str = "exact"
    nlist: int = 1024
    nprobe: int = 16
    chunk_size: int = 16384


@dataclass(frozen=True)
class Metric:
    """How one metric maps onto FAISS: vector preparation, index kind, score -> distance."""

    inner_product: bool
    prepare: Callable[[np.ndarray], np.ndarray]
    to_distance: Callable[[np.ndarray], np.ndarray]
    distance: str  # name written to the metadata
    refine: bool = False  # recompute candidate distances directly (see _refine_l2)


def _unit(x: np.ndarray) -> np.ndarray:
    # Zero vectors stay zero (cosine similarity 0 to everything) instead of becoming NaN.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny), np.float32)


METRICS: dict[str, Metric] = {
    # FAISS returns squared L2; we store the distance itself, clamped because the BLAS
    # expansion |q|^2 + |x|^2 - 2 q.x can dip slightly below zero for duplicates.
    "euclidean": Metric(False, lambda x: x, lambda d: np.sqrt(np.maximum(d, 0)), "l2", True),
    "cosine": Metric(True, _unit, lambda s: 1.0 - s, "cosine"),
}
INDEXES = ("exact", "ivf")


def _check_metric(metric: str) -> Metric:
    if metric not in METRICS:
        raise PipelineError(f"unknown metric {metric!r}; use one of: {', '.join(sorted(METRICS))}")
    return METRICS[metric]


def _as_float32(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise PipelineError(f"{name} must be a non-empty 2-D array (N, d), got shape {x.shape}")
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise PipelineError(f"{name}: {bad} of {len(x)} rows contain NaN or infinite values")
    return x


def ivf_cells(nlist: int, n: int) -> int:
    """IVF cell count actually used: ``nlist`` clamped so each cell has >= 39 training points."""
    return max(1, min(nlist, n // MIN_POINTS_PER_CELL))


def _build_index(x: np.ndarray, m: Metric, index: str, nlist: int, nprobe: int,
                 use_gpu: bool, gpu_id: int):
    """FAISS index holding ``x`` (N, d), on the GPU when asked.

    Returns (index, IVF cells or 0, GPU resources or None); the caller keeps the resources
    alive for as long as it searches.
    """
    import faiss

    d = x.shape[1]
    flat = faiss.IndexFlatIP(d) if m.inner_product else faiss.IndexFlatL2(d)
    cells = 0
    ix = flat
    if index == "ivf":
        cells = ivf_cells(nlist, len(x))
        metric = faiss.METRIC_INNER_PRODUCT if m.inner_product else faiss.METRIC_L2
        # The Python wrapper keeps a reference to the quantizer ``flat``.
        ix = faiss.IndexIVFFlat(flat, d, cells, metric)
    res = None
    if use_gpu:
        res = faiss.StandardGpuResources()
        ix = faiss.index_cpu_to_gpu(res, gpu_id, ix)
    if cells:
        # k-means uses FAISS's fixed default seed, so the cells are the same run to run.
        ix.train(x)
        ix.nprobe = min(nprobe, cells)
    ix.add(x)
    return ix, cells, res


def _drop_self(D: np.ndarray, I: np.ndarray, rows: np.ndarray, k: int):  # noqa: E741
    """Remove each query's own row wherever it appears (ties with duplicates can put it
    anywhere), and FAISS's -1 padding; keep the first ``k``. Returns (D, I, ok)."""
    keep = (I != rows[:, None]) & (I >= 0)
    # A stable sort of "is dropped" moves kept entries to the front in their FAISS order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    ok = np.take_along_axis(keep, order, axis=1).all(axis=1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1), ok


def knn(
    x: np.ndarray, k: int, metric: str, *, ids: np.ndarray | None = None, index: str = "exact",
    nlist: int = 1024, nprobe: int = 16, chunk_size: int = 16384, use_gpu: bool = False,
    gpu_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-kNN: the ``k`` nearest other rows of every row of ``x``, nearest first.

    Each row is excluded from its own list by identity (its row, hence its id), not by
    dropping the first column: a duplicate vector ties with self and may come first.

    Args:
        x: (N, d) vectors; coerced to contiguous float32; must be finite.
        k: neighbours per row, 1 <= k < N.
        metric: ``euclidean`` or ``cosine`` (inner product on L2-normalised rows).
        ids: optional (N,) int64 ids of the rows; when given, ``I`` holds ids, else positions.
        index: ``exact`` (flat) or ``ivf`` (IndexIVFFlat, ``nlist`` cells clamped to N/39,
            ``nprobe`` visited per query).
        chunk_size: queries per search call, bounding the (chunk, k) result memory.
        use_gpu: search on GPU ``gpu_id`` (needs a faiss build with GPUs).

    Returns:
        D: (N, k) float32 distances (euclidean distance, or 1 - cosine similarity).
        I: (N, k) int64 neighbour ids (or positions).
    """
    import faiss

    m = _check_metric(metric)
    if index not in INDEXES:
        raise PipelineError(f"unknown index {index!r}; use one of: {', '.join(INDEXES)}")
    x = m.prepare(_as_float32(x))
    n = len(x)
    if not 1 <= k < n:
        raise PipelineError(f"k = {k} must be at least 1 and less than the number of rows ({n})")
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("chunk_size", chunk_size)):
        if value < 1:
            raise PipelineError(f"{name} must be at least 1, got {value}")
    if ids is not None and len(ids) != n:
        raise PipelineError(f"ids has {len(ids)} rows, x has {n}")
    if use_gpu and (faiss.get_num_gpus() == 0 or k + 1 > GPU_MAX_K):
        use_gpu = False
    saved_threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    try:
        D, I = _search(x, k, m, index, nlist, nprobe, chunk_size, use_gpu, gpu_id)  # noqa: E741
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved_threshold
    if ids is not None:
        I = np.asarray(ids, np.int64)[I]  # noqa: E741
    return D, I


def _refine_l2(xt, rows: np.ndarray, D: np.ndarray, I: np.ndarray):  # noqa: E741
    """Squared L2 of each query to its candidates computed as |q - x|^2, candidates re-sorted.

    FAISS's |q|^2 + |x|^2 - 2 q.x loses the small distances to cancellation (two identical
    images come out ~1e-2 apart instead of 0); the direct difference is exact for duplicates.
    Runs with torch where ``xt`` lives (the GPU when the search ran there).

    Args:
        xt: (N, d) float32 torch tensor of all vectors.
        rows: (q,) query positions; D, I: (q, c) FAISS results, -1 where missing.
    """
    import torch

    d2 = np.empty(I.shape, np.float32)
    # Gathered candidates take q*c*d floats; blocks keep that near 128 MB even for pixels.
    step = max(1, 2**25 // (I.shape[1] * xt.shape[1]))
    for s in range(0, len(rows), step):
        idx = torch.from_numpy(np.maximum(I[s:s + step], 0)).to(xt.device)
        q = xt[torch.from_numpy(rows[s:s + step]).to(xt.device)]
        d2[s:s + step] = ((xt[idx] - q[:, None, :]) ** 2).sum(-1).cpu().numpy()
    d2[I < 0] = np.inf
    order = np.argsort(d2, axis=1, kind="stable")
    return np.take_along_axis(d2, order, axis=1), np.take_along_axis(I, order, axis=1)


def _search(x, k, m, index, nlist, nprobe, chunk_size, use_gpu, gpu_id):
    """Build the index and run the chunked self-search of ``knn`` on prepared vectors."""
    import torch

    n, search_k = len(x), k + 1
    ix, cells, _res = _build_index(x, m, index, nlist, nprobe, use_gpu, gpu_id)
    on_cuda = use_gpu and torch.cuda.is_available()
    xt = torch.from_numpy(x).to(f"cuda:{gpu_id}" if on_cuda else "cpu") if m.refine else None

    def search(rows):
        D, I = ix.search(x[rows], search_k)  # noqa: E741
        if m.refine:
            D, I = _refine_l2(xt, rows, D, I)  # noqa: E741
        return _drop_self(D, I, rows, k)

    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)  # noqa: E741
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        Dc, Ic, ok = search(rows)
        if not ok.all():
            # IVF: the visited cells held fewer than k+1 points; visit every cell for these.
            redo = rows[~ok]
            ix.nprobe = cells
            Dr, Ir, ok_r = search(redo)
            ix.nprobe = min(nprobe, cells)
            assert ok_r.all(), "exhaustive IVF search returned fewer than k+1 results"
            Dc[~ok], Ic[~ok] = Dr, Ir
        D[rows], I[rows] = m.to_distance(Dc), Ic
    return D, I


def backend_name(index: str, use_gpu: bool) -> str:
    return f"faiss-{'gpu' if use_gpu else 'cpu'}-{'flat' if index == 'exact' else 'ivf'}"


def gpu_usable(dev, k: int) -> bool:
    """Whether to search on the GPU: ``dev`` (a torch.device) is CUDA, this faiss build has
    GPUs (else a note on stderr) and ``k`` + 1 fits FAISS's GPU k-selection."""
    use_gpu = False
    if dev.type == "cuda":
        import faiss

        use_gpu = faiss.get_num_gpus() > 0
        if not use_gpu:
            print("CUDA is present but this faiss build has no GPU support; searching on CPU",
                  file=sys.stderr)
    return use_gpu and k + 1 <= GPU_MAX_K


def search_metadata(params: NeighboursParams, metric: str, n: int, backend: str) -> dict:
    """The search settings of a neighbours table, as written to its metadata (n images)."""
    ivf = params.index == "ivf"
    return {
        "metric": metric,
        "distance": METRICS[metric].distance,
        "k": params.k,
        "backend": backend,
        "index": params.index,
        "nlist": ivf_cells(params.nlist, n) if ivf else "",
        "nprobe": min(params.nprobe, ivf_cells(params.nlist, n)) if ivf else "",
    }
