"""Self-kNN with FAISS: metrics, exact or IVF index, chunked queries, on the GPU or the CPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline import PipelineError
from pipeline.features import PixelMatrix

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


class _Vectors:
    """The rows a search reads, prepared for its metric (contiguous float32, finite).

    An array in memory is prepared once; a lazily read matrix (raw pixels,
    :class:`~pipeline.features.PixelMatrix`) is read and prepared again wherever it is
    indexed, so that the FAISS index holds the only float copy of every row.
    """

    def __init__(self, x, m: Metric):
        self.lazy = not isinstance(x, np.ndarray)
        if not self.lazy:
            x = m.prepare(_as_float32(x))
        elif len(x.shape) != 2 or 0 in x.shape:
            raise PipelineError(f"x must be a non-empty 2-D array (N, d), got shape {x.shape}")
        self.x, self.m, self.shape = x, m, tuple(x.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not self.lazy:
            return self.x[key]
        return self.m.prepare(_as_float32(self.x[key]))

    def training_sample(self, most: int, chunk: int) -> np.ndarray:
        """The rows IVF k-means trains on: all of an array in memory (FAISS samples itself);
        of a lazy matrix all when N <= ``most``, else ``most`` rows drawn with a fixed seed,
        read ``chunk`` rows at a time."""
        n = len(self)
        if not self.lazy:
            return self.x
        rows = np.arange(n) if n <= most else np.sort(
            np.random.default_rng(1234).choice(n, most, replace=False))
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for start in range(0, len(rows), chunk):
            out[start:start + chunk] = self[rows[start:start + chunk]]
        return out


def ivf_cells(nlist: int, n: int) -> int:
    """IVF cell count actually used: ``nlist`` clamped so each cell has >= 39 training points."""
    return max(1, min(nlist, n // MIN_POINTS_PER_CELL))


# FAISS k-means trains on at most this many points per cell (its max_points_per_centroid);
# a lazily read source hands it a sample of that size instead of every row.
KMEANS_POINTS_PER_CELL = 256


def _build_index(vectors: _Vectors, m: Metric, index: str, nlist: int, nprobe: int,
                 use_gpu: bool, gpu_id: int, chunk_size: int):
    """FAISS index holding every row of ``vectors`` (N, d), on the GPU when asked; rows are
    added ``chunk_size`` at a time, at most 256 MB of float32 (the result is the same).

    Returns (index, IVF cells or 0, GPU resources or None); the caller keeps the resources
    alive for as long as it searches.
    """
    import faiss

    n, d = vectors.shape
    chunk_size = max(1, min(chunk_size, 2**26 // d))
    flat = faiss.IndexFlatIP(d) if m.inner_product else faiss.IndexFlatL2(d)
    cells = 0
    ix = flat
    if index == "ivf":
        cells = ivf_cells(nlist, n)
        metric = faiss.METRIC_INNER_PRODUCT if m.inner_product else faiss.METRIC_L2
        # The Python wrapper keeps a reference to the quantizer ``flat``.
        ix = faiss.IndexIVFFlat(flat, d, cells, metric)
    res = None
    if use_gpu:
        res = faiss.StandardGpuResources()
        ix = faiss.index_cpu_to_gpu(res, gpu_id, ix)
    if cells:
        # k-means uses FAISS's fixed default seed, so the cells are the same run to run.
        ix.train(vectors.training_sample(KMEANS_POINTS_PER_CELL * cells, chunk_size))
        ix.nprobe = min(nprobe, cells)
    for start in range(0, n, chunk_size):
        ix.add(vectors[start:start + chunk_size])
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
    x: np.ndarray | PixelMatrix, k: int, metric: str, *, ids: np.ndarray | None = None,
    index: str = "exact", nlist: int = 1024, nprobe: int = 16, chunk_size: int = 16384,
    use_gpu: bool = False, gpu_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-kNN: the ``k`` nearest other rows of every row of ``x``, nearest first.

    Each row is excluded from its own list by identity (its row, hence its id), not by
    dropping the first column: a duplicate vector ties with self and may come first.

    Memory: the FAISS index (flat, or IVFFlat) holds every row as float32, N x d x 4 bytes, in
    host memory (or on the GPU when ``use_gpu``); that is the search's floor. Beyond it an
    array ``x`` in memory costs one prepared copy (none for contiguous float32 euclidean),
    while a lazily read ``x`` (raw pixels) is read a chunk at a time, to fill the index (at
    most 256 MB at once) and again as queries, plus for IVF a k-means sample of at most 256
    rows per cell.
    Raw pixels of 1M 32x32x3 images thus need 12.3 GB for the index (see
    :func:`index_bytes`).

    Args:
        x: (N, d) vectors: an array (coerced to contiguous float32; must be finite) or a
            :class:`~pipeline.features.PixelMatrix`, read where indexed.
        k: neighbours per row, 1 <= k < N.
        metric: ``euclidean`` or ``cosine`` (inner product on L2-normalised rows).
        ids: optional (N,) int64 ids of the rows; when given, ``I`` holds ids, else positions.
        index: ``exact`` (flat) or ``ivf`` (IndexIVFFlat, ``nlist`` cells clamped to N/39,
            ``nprobe`` visited per query).
        chunk_size: rows per add and queries per search call, bounding the (chunk, d) reads
            and the (chunk, k) result memory.
        use_gpu: search on GPU ``gpu_id`` (needs a faiss build with GPUs).

    Returns:
        D: (N, k) float32 distances (euclidean distance, or 1 - cosine similarity).
        I: (N, k) int64 neighbour ids (or positions).
    """
    import faiss

    m = _check_metric(metric)
    if index not in INDEXES:
        raise PipelineError(f"unknown index {index!r}; use one of: {', '.join(INDEXES)}")
    vectors = _Vectors(x, m)
    n = len(vectors)
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
        D, I = _search(vectors, k, m, index, nlist, nprobe, chunk_size, use_gpu,  # noqa: E741
                       gpu_id)
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved_threshold
    if ids is not None:
        I = np.asarray(ids, np.int64)[I]  # noqa: E741
    return D, I


def _refine_l2(vectors: _Vectors, rows: np.ndarray, D: np.ndarray,
               I: np.ndarray, device: str = "cpu"):  # noqa: E741
    """Squared L2 of each query to its candidates computed as |q - x|^2, candidates re-sorted.

    FAISS's |q|^2 + |x|^2 - 2 q.x loses the small distances to cancellation (two identical
    images come out ~1e-2 apart instead of 0); the direct difference is exact for duplicates.
    The candidates are gathered from ``vectors`` a block at a time and compared with torch
    on ``device`` (the GPU when the search ran there).

    Args:
        vectors: the (N, d) rows searched.
        rows: (q,) query positions; D, I: (q, c) FAISS results, -1 where missing.
    """
    import torch

    d2 = np.empty(I.shape, np.float32)
    # Gathered candidates take q*c*d floats; blocks keep that near 128 MB even for pixels.
    step = max(1, 2**25 // (I.shape[1] * vectors.shape[1]))
    for s in range(0, len(rows), step):
        idx = np.maximum(I[s:s + step], 0)
        cand = vectors[idx.ravel()].reshape(*idx.shape, -1)
        cand = torch.from_numpy(np.require(cand, requirements="W")).to(device)
        q = torch.from_numpy(np.require(vectors[rows[s:s + step]], requirements="W")).to(device)
        d2[s:s + step] = ((cand - q[:, None, :]) ** 2).sum(-1).cpu().numpy()
    d2[I < 0] = np.inf
    order = np.argsort(d2, axis=1, kind="stable")
    return np.take_along_axis(d2, order, axis=1), np.take_along_axis(I, order, axis=1)


def _search(vectors, k, m, index, nlist, nprobe, chunk_size, use_gpu, gpu_id):
    """Build the index and run the chunked self-search of ``knn`` on prepared vectors."""
    n, search_k = len(vectors), k + 1
    ix, cells, _res = _build_index(vectors, m, index, nlist, nprobe, use_gpu, gpu_id,
                                   chunk_size)
    device = "cpu"
    if use_gpu:  # torch only where the search runs on the GPU: its import alone takes ~2 s
        import torch

        device = f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"

    def search(rows):
        D, I = ix.search(vectors[rows], search_k)  # noqa: E741
        if m.refine:
            D, I = _refine_l2(vectors, rows, D, I, device)  # noqa: E741
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


def index_bytes(n: int, d: int, index: str = "exact", nlist: int = 1024,
                lazy: bool = False) -> int:
    """Bytes a search of ``n`` rows of dimension ``d`` holds beyond its inputs and outputs:
    the index's float32 copy of every row, plus for a lazily read source IVF's k-means sample
    (for a source in memory, its prepared copy instead)."""
    extra = n
    if lazy:
        extra = min(n, KMEANS_POINTS_PER_CELL * ivf_cells(nlist, n)) if index == "ivf" else 0
    return 4 * d * (n + extra)


def available_memory(device=None) -> int | None:
    """Bytes free to allocate: on a CUDA ``device`` its free memory; else the host's
    MemAvailable, capped by what a cgroup (a batch job's limit) leaves beside its anonymous
    memory (page cache, such as the memory-mapped images, can be evicted). None if unknown."""
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])

    def field(path: str, name: str) -> int | None:
        try:
            with open(path) as fh:
                return next((int(line.split()[1]) for line in fh
                             if line.split()[0] == name), None)
        except (OSError, ValueError, IndexError):
            return None

    free = []
    available = field("/proc/meminfo", "MemAvailable:")
    if available is not None:
        free.append(available * 1024)
    for limit, stat, anon in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.stat", "anon"),
                              ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                               "/sys/fs/cgroup/memory/memory.stat", "rss")):
        try:
            with open(limit) as fh:
                cap = fh.read().strip()
        except OSError:
            continue
        used = field(stat, anon)
        if cap.isdigit() and int(cap) < 2**60 and used is not None:
            free.append(max(int(cap) - used, 0))
        break
    return min(free) if free else None


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
            _cpu_faiss_note()
    return use_gpu and k + 1 <= GPU_MAX_K


def _cpu_faiss_note() -> None:
    print("CUDA is present but this faiss build has no GPU support; searching on CPU",
          file=sys.stderr)


def search_device(name: str, k: int):
    """The CUDA device (a torch.device) to search on, or None to search on the CPU.

    ``name`` is the stage's ``--device``; a GPU is used where :func:`gpu_usable` says so. torch
    is imported only to resolve (and claim, see :func:`pipeline.device.resolve_device`) a
    device that may be a GPU: never for ``cpu``, nor for ``auto`` where this faiss build sees
    no GPU, as with faiss-cpu (the note that CUDA goes unused is then based on the host's
    ``nvidia-smi``). Importing torch alone takes ~2 s, 20 times the search of a small set.
    """
    if name == "cpu":
        return None
    if name == "auto":
        import faiss

        if faiss.get_num_gpus() == 0:
            from pipeline.threads import host_gpus

            if host_gpus() > 0:
                _cpu_faiss_note()
            return None
    from pipeline.device import resolve_device

    dev = resolve_device(name)
    return dev if gpu_usable(dev, k) else None


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
