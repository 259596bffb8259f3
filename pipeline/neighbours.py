"""k nearest training neighbours of every training image in one space (FAISS, GPU or CPU)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.features import align, pixel_features
from pipeline.io import (
    TRAINING_SPLITS,
    Prepared,
    atomic_path,
    code_version,
    load_prepared,
    read_latents,
)
from pipeline.latent_health import SPREAD_MIN

# Query count from which FAISS computes distances as one BLAS matrix product; faiss 1.15
# defaults to 128000, but its blocked sgemm path is 1.4-2.7x faster here for any chunk.
BLAS_THRESHOLD = 20
# FAISS GPU k-selection handles at most this many results per query.
GPU_MAX_K = 2048
# FAISS k-means wants at least this many training points per IVF cell.
MIN_POINTS_PER_CELL = 39
GRID_ANCHORS = 8
# Quality gate (purity table): a latent space is flagged when its purity@1 is more than
# PURITY_MARGIN below raw pixels' under the same metric. 0.05 is well above the sampling
# error of a purity over >= 1,000 images (sd <= 0.016) and below the gaps of broken spaces
# (issue 12: 0.557 against 0.955).
PURITY_MARGIN = 0.05
# Label-free signals, judged against pixels' values where there are pixel neighbours:
# orphans (images in no list) at least ORPHAN_EXCESS above pixels' and at least ORPHAN_MIN;
# a hub at least HUB_FACTOR times pixels' largest in-degree and at least HUB_MIN_K * k.
ORPHAN_EXCESS, ORPHAN_MIN = 0.10, 0.15
HUB_FACTOR, HUB_MIN_K = 2.0, 10
# Latent export metadata copied into the neighbours metadata and the purity table.
HEALTH_KEYS = ("recon_ratio", "latent_spread", "latent_collapsed")
FLAG_COLUMNS = ["pixels_purity_at_1", "purity_gap_at_1", *HEALTH_KEYS, "flagged", "flag_reason"]
PURITY_COLUMNS = ["space", "metric", "k", "purity_at_1", "purity_at_k", "hub_max_in_degree",
                  "hub_orphan_fraction", "backend", "seconds"]


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


def purity(labels: np.ndarray, neighbour_labels: np.ndarray) -> tuple[float, float]:
    """Fraction of neighbours sharing the anchor's label, at rank 1 and over all k.

    Pairs where either label is unknown (< 0) are left out; NaN when no pair is left.

    Args:
        labels: (N,) int anchor labels.
        neighbour_labels: (N, k) int labels of each anchor's neighbours, nearest first.
    """
    labels = np.asarray(labels)[:, None]
    nl = np.asarray(neighbour_labels)
    valid = (labels >= 0) & (nl >= 0)
    same = (nl == labels) & valid

    def frac(s, v):
        return float(s.sum() / v.sum()) if v.sum() else float("nan")

    return frac(same[:, :1], valid[:, :1]), frac(same, valid)


def hubness(neighbour_index: np.ndarray, n: int) -> tuple[int, float]:
    """In-degree statistics of a kNN graph.

    Args:
        neighbour_index: (N, k) neighbour positions in [0, n).
        n: number of nodes.

    Returns:
        (largest in-degree, fraction of nodes that are nobody's neighbour).
    """
    counts = np.bincount(np.asarray(neighbour_index).ravel(), minlength=n)
    return int(counts.max()), float((counts == 0).mean())


def load_source(source: Path, data: Prepared) -> tuple[np.ndarray, str, dict[str, str]]:
    """Vectors of the training images of ``data``, in its order; plus space name and metadata.

    ``source`` is a latent export (``.parquet``) or the prepared set itself (``.npz``: raw
    pixels flattened to float32 in [0, 1]).

    Returns:
        x: (N_train, d) float32; space: latent model name or ``pixels``; metadata of the source.
    """
    source = Path(source)
    train = np.isin(data.split, TRAINING_SPLITS)
    if source.suffix == ".npz":
        return pixel_features(data.subset(*TRAINING_SPLITS)), "pixels", {}
    if source.suffix != ".parquet":
        raise PipelineError(f"cannot read neighbours source {source}: expected .parquet or .npz")
    if not source.exists():
        raise PipelineError(f"latents not found: {source}")
    ids, x, meta = read_latents(source)
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise PipelineError(f"{source}: {bad} of {len(x)} latent rows contain NaN or infinite "
                            "values")
    # The export holds every prepared image; the search wants the training ones.
    pos = align(ids, data.ids[train], "training", source, known=data.ids)
    return x[pos], meta.get("model", source.parent.name), meta


def _frame(img: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """Image (H, W, C) -> RGB float with a coloured border, so label agreement shows."""
    img = img.astype(np.float32) / 255.0
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    w = max(1, img.shape[0] // 12)
    out = np.empty((img.shape[0] + 2 * w, img.shape[1] + 2 * w, 3), np.float32)
    out[:] = colour
    out[w:-w, w:-w] = img
    return out


ANCHOR, SAME, OTHER, UNKNOWN = (0.2, 0.4, 1.0), (0.1, 0.75, 0.2), (0.9, 0.1, 0.1), (0.6, 0.6, 0.6)


def grid_anchors(labels: np.ndarray, max_rows: int = 20) -> np.ndarray:
    """Row indices of the grid's anchors: the first training image of each class, in label
    order (up to ``max_rows`` classes), so every class shows and the choice is the same every
    run; evenly spaced images when no label is known."""
    known = np.flatnonzero(labels >= 0)
    if len(known) == 0:
        n = len(labels)
        return np.unique(np.linspace(0, n - 1, min(GRID_ANCHORS, n)).round().astype(int))
    _, first = np.unique(labels[known], return_index=True)  # classes in label order
    return known[first][:max_rows]


def neighbour_grid(train: Prepared, I_pos: np.ndarray, path: Path, title: str) -> None:
    """PNG of one anchor per class (first column, blue) and its neighbours, nearest first:
    green border = same label as the anchor, red = different (its label written under it),
    grey = unknown."""
    from pipeline.plots import image_grid

    def name(label: int) -> str:
        return train.classes[label] if 0 <= label < len(train.classes) else "?"

    rows, row_labels, cell_labels = [], [], []
    for a in grid_anchors(train.labels):
        la = int(train.labels[a])
        row, cells = [_frame(train.images[a], ANCHOR)], [""]
        for j in I_pos[a]:
            lj = int(train.labels[j])
            colour = UNKNOWN if la < 0 or lj < 0 else SAME if lj == la else OTHER
            row.append(_frame(train.images[j], colour))
            cells.append(name(lj) if colour is OTHER else "")
        rows.append(np.stack(row))
        cell_labels.append(cells)
        same = int(sum(train.labels[j] == la for j in I_pos[a])) if la >= 0 else 0
        row_labels.append(f"{name(la)} ({same}/{I_pos.shape[1]})")
    cols = ["anchor"] + [str(j + 1) for j in range(I_pos.shape[1])]
    image_grid(rows, path, row_labels=row_labels, col_labels=cols, title=title,
               cell_labels=cell_labels)


def find_neighbours(
    params: NeighboursParams, source: Path, data: Path, metric: str, out: Path, grid: Path,
    device: str,
) -> None:
    """Write ``neighbours.parquet`` (one row per training image) and its grid PNG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.device import resolve_device

    _check_metric(metric)
    if params.index not in INDEXES:
        raise PipelineError(f"neighbours.index: unknown index {params.index!r}; use one of: "
                            f"{', '.join(INDEXES)}")
    dev = resolve_device(device)
    prepared = load_prepared(data)
    prepared.check()
    train = prepared.subset(*TRAINING_SPLITS)
    n, k = len(train.ids), params.k
    if k >= n:
        raise PipelineError(
            f"neighbours.k = {k} must be less than the number of training images ({n}) in {data}"
        )
    x, space, source_meta = load_source(Path(source), prepared)
    use_gpu = False
    if dev.type == "cuda":
        import faiss

        use_gpu = faiss.get_num_gpus() > 0
        if not use_gpu:
            print("CUDA is present but this faiss build has no GPU support; searching on CPU",
                  file=sys.stderr)
    use_gpu = use_gpu and k + 1 <= GPU_MAX_K
    backend = backend_name(params.index, use_gpu)
    print(f"{space} {metric}: {n} training vectors of dim {x.shape[1]}, k={k}, {backend}")
    t0 = time.perf_counter()
    D, I_pos = knn(x, k, metric, index=params.index, nlist=params.nlist, nprobe=params.nprobe,
                   chunk_size=params.chunk_size, use_gpu=use_gpu,
                   gpu_id=(dev.index or 0) if dev.type == "cuda" else 0)
    seconds = time.perf_counter() - t0
    p1, pk = purity(train.labels, train.labels[I_pos])
    hub_max, orphans = hubness(I_pos, n)
    print(f"purity@1 {p1:.4f}, purity@{k} {pk:.4f}, hub max in-degree {hub_max}, "
          f"orphans {orphans:.4f}, {seconds:.2f} s")

    meta = {
        "metric": metric,
        "distance": METRICS[metric].distance,
        "k": k,
        "backend": backend,
        "index": params.index,
        "nlist": ivf_cells(params.nlist, n) if params.index == "ivf" else "",
        "nprobe": min(params.nprobe, ivf_cells(params.nlist, n)) if params.index == "ivf" else "",
        "space": space,
        "dataset": source_meta.get("dataset", Path(data).parent.name),
        "purity_at_1": p1,
        "purity_at_k": pk,
        "hub_max_in_degree": hub_max,
        "hub_orphan_fraction": orphans,
        "n": n,
        "dim": x.shape[1],
        "code_version": code_version(),
        "seconds": round(seconds, 4),
        "source": str(source),
        # the latent model's own health, from its export (absent for pixels and old exports)
        **{key: source_meta[key] for key in HEALTH_KEYS if key in source_meta},
    }
    ids = train.ids.astype(np.int64)
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
    title = (f"{space} / {metric}: purity@1 {p1:.2f}, purity@{k} {pk:.2f}\n"
             "border: blue anchor, green same label, red other label, grey unknown")
    neighbour_grid(train, I_pos, Path(grid), title)


def purity_table(inputs: list[Path], out: Path) -> None:
    """CSV with one row per ``neighbours.parquet``: purity and hubness, sorted by space, metric."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path in inputs:
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"neighbours not found: {path}")
        try:
            raw = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowInvalid) as e:
            raise PipelineError(f"{path}: cannot read neighbours ({e})") from None
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        missing = [c for c in PURITY_COLUMNS if c not in meta]
        if missing:
            raise PipelineError(f"{path}: metadata lacks {', '.join(missing)}")
        rows.append({c: meta.get(c) for c in PURITY_COLUMNS + list(HEALTH_KEYS)})
    df = pd.DataFrame(rows, columns=PURITY_COLUMNS + list(HEALTH_KEYS))
    for c in ("k", "hub_max_in_degree"):
        df[c] = df[c].astype(int)
    for c in ("purity_at_1", "purity_at_k", "hub_orphan_fraction", "seconds", "recon_ratio",
              "latent_spread"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df = quality_gate(df.sort_values(["space", "metric", "k"]).reset_index(drop=True))
    for row in df[df["flagged"]].itertuples(index=False):
        print(f"WARNING: latent space {row.space!r} ({row.metric}) is flagged: "
              f"{row.flag_reason}; BYOL runs mining it are flagged in the results table",
              file=sys.stderr)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def quality_gate(df):
    """Add the quality-gate columns to a purity table (one row per space and metric).

    Each latent space is compared with raw pixels under the same metric and k, where that row
    exists: ``pixels_purity_at_1``, ``purity_gap_at_1`` (space minus pixels), then
    ``flagged`` and ``flag_reason`` (``"; "``-joined): purity@1 more than PURITY_MARGIN below
    pixels'; label-free, so also for unlabelled data: many orphans or a strong hub compared
    with pixels (absolute bounds when there is no pixel row), latents with no variance, a
    model that collapsed in training (kept with ``latent.on_collapse: warn``).
    """
    import pandas as pd

    pixels = df[df["space"] == "pixels"].set_index(["metric", "k"])
    ref = [pixels.loc[key] if key in pixels.index else None
           for key in zip(df["metric"], df["k"], strict=True)]
    flagged, reasons = [], []
    for row, px in zip(df.itertuples(index=False), ref, strict=True):
        why = []
        if row.space != "pixels":
            gap = px["purity_at_1"] - row.purity_at_1 if px is not None else float("nan")
            if gap > PURITY_MARGIN:
                why.append(f"purity@1 {row.purity_at_1:.3f} is {gap:.3f} below raw pixels' "
                           f"{px['purity_at_1']:.3f} (margin {PURITY_MARGIN})")
            orphan_ref = px["hub_orphan_fraction"] if px is not None else ORPHAN_MIN
            if row.hub_orphan_fraction >= max(ORPHAN_MIN, orphan_ref + ORPHAN_EXCESS):
                why.append(f"{row.hub_orphan_fraction:.0%} of images are in no neighbour list"
                           + (f" (pixels: {orphan_ref:.0%})" if px is not None else ""))
            hub_ref = px["hub_max_in_degree"] if px is not None else HUB_MIN_K * row.k
            if row.hub_max_in_degree >= max(HUB_MIN_K * row.k, HUB_FACTOR * hub_ref):
                why.append(f"one image is in {row.hub_max_in_degree} neighbour lists"
                           + (f" (pixels: at most {hub_ref})" if px is not None else ""))
            if pd.notna(row.latent_spread) and row.latent_spread < SPREAD_MIN:
                why.append(f"latents have no variance across images ({row.latent_spread:.2g})")
            if str(row.latent_collapsed).lower() == "true":
                why.append("the latent model collapsed in training (on_collapse: warn)")
        flagged.append(bool(why))
        reasons.append("; ".join(why))
    out = df.copy()
    out["pixels_purity_at_1"] = [px["purity_at_1"] if px is not None else float("nan")
                                 for px in ref]
    out["purity_gap_at_1"] = out["purity_at_1"] - out["pixels_purity_at_1"]
    out["flagged"], out["flag_reason"] = flagged, reasons
    return out[PURITY_COLUMNS + FLAG_COLUMNS]
