"""Self-kNN wall time versus N: FAISS (CPU, GPU), torch matmul+topk, scikit-learn brute force.

Every backend answers the same question as the neighbours stage: the k nearest other rows of
every row (search k+1, drop self). Times include building the index. Prints one table with the
speed-up of each backend over scikit-learn and its id agreement with exact FAISS (for the
approximate ``faiss-ivf``, on CPU, that agreement is its recall@k).

    .venv/bin/python bench/bench_knn.py --n 10000 20000 50000
    python bench/bench_knn.py --n 100000 1000000 --backends faiss-gpu torch   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BACKENDS = ("faiss-cpu", "faiss-gpu", "faiss-ivf", "torch", "sklearn")


def make_data(n: int, d: int, kind: str, seed: int = 0) -> np.ndarray:
    """(n, d) float32: standard Gaussian, or 100 Gaussian clusters (a more realistic latent)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, d), dtype=np.float32)
    centres = rng.standard_normal((100, d), dtype=np.float32) * 2
    return centres[rng.integers(0, 100, n)] + rng.standard_normal((n, d), dtype=np.float32)


def run_faiss(x: np.ndarray, k: int, gpu: bool, index: str = "exact", nprobe: int = 16
              ) -> np.ndarray:
    from pipeline.neighbours import knn

    # IVF with sqrt(N) cells (k-means cost stays below the flat search).
    nlist = int(np.sqrt(len(x)))
    return knn(x, k, "euclidean", use_gpu=gpu, index=index, nlist=nlist, nprobe=nprobe)[1]


def run_torch(x: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Chunked |q|^2 - 2 q.x + |x|^2 and topk(k+1) on the GPU when present, else the CPU."""
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xt = torch.from_numpy(x).to(dev)
    sq = (xt * xt).sum(1)
    out = []
    for s in range(0, len(xt), chunk):
        q = xt[s:s + chunk]
        dist = sq[s:s + chunk, None] - 2 * q @ xt.T + sq[None, :]
        rows = torch.arange(s, s + len(q), device=dev)
        dist[torch.arange(len(q), device=dev), rows] = float("inf")  # self
        out.append(dist.topk(k, dim=1, largest=False).indices.cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out).numpy()


def run_sklearn(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    # kneighbors() with no argument queries the fitted points and leaves each one out.
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x)
    return nn.kneighbors(return_distance=False)


RUNNERS = {
    "faiss-cpu": lambda x, k: run_faiss(x, k, gpu=False),
    "faiss-gpu": lambda x, k: run_faiss(x, k, gpu=True),
    "torch": run_torch,
    "sklearn": run_sklearn,
}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of ids two kNN lists share (1.0 up to ties)."""
    return float(np.mean([len(set(p) & set(q)) / len(p) for p, q in zip(a, b, strict=True)]))


def versions() -> str:
    import faiss
    import sklearn
    import torch

    return (f"python {platform.python_version()}, numpy {np.__version__}, faiss {faiss.__version__}"
            f", torch {torch.__version__}, scikit-learn {sklearn.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 20_000, 50_000])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=["gaussian", "clustered"], default="clustered")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--slow-max-n", type=int, default=50_000,
                   help="skip torch on CPU and sklearn above this N (quadratic, minutes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16],
                   help="IVF cells visited per query; one faiss-ivf row per value")
    p.add_argument("--openblas-autodetect", action="store_true",
                   help="leave OpenBLAS core detection alone (faiss-cpu's bundled OpenBLAS "
                   "picks generic kernels on recent Xeons); default: as the stage runs")
    a = p.parse_args(argv)

    if not a.openblas_autodetect:
        from pipeline.neighbours import prefer_fast_openblas

        prefer_fast_openblas()  # before faiss loads its OpenBLAS, as in the stage
    import os

    import faiss
    import torch

    from pipeline.threads import set_threads

    set_threads(a.threads)
    for nprobe in a.nprobe:
        RUNNERS[f"faiss-ivf{nprobe}"] = partial(run_faiss, gpu=False, index="ivf", nprobe=nprobe)
    backends = [b for b in a.backends if b != "faiss-ivf"]
    if "faiss-ivf" in a.backends:
        backends[1:1] = [f"faiss-ivf{nprobe}" for nprobe in a.nprobe]
    has_gpu = torch.cuda.is_available() and faiss.get_num_gpus() > 0
    print(f"# {versions()}")
    print(f"# threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"# d={a.d}, k={a.k}, data={a.data}, float32; seconds include index build; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(autodetect)')}")
    print(f"{'N':>9}  {'backend':<12} {'seconds':>9} {'vs sklearn':>11} {'agree':>6}  note")
    for n in a.n:
        x = make_data(n, a.d, a.data)
        times, ids, notes = {}, {}, {}
        for b in backends:
            torch_on_cpu = b == "torch" and not torch.cuda.is_available()
            if b == "faiss-gpu" and not has_gpu:
                notes[b] = "skipped: no GPU"
                continue
            if (b == "sklearn" or torch_on_cpu) and n > a.slow_max_n:
                notes[b] = f"skipped: N > --slow-max-n {a.slow_max_n} (quadratic on CPU)"
                continue
            if b in ("faiss-gpu", "torch") and torch.cuda.is_available():
                RUNNERS[b](x[:2000], a.k)  # warm up CUDA context and kernels outside the timing
            t0 = time.perf_counter()
            ids[b] = RUNNERS[b](x, a.k)
            times[b] = time.perf_counter() - t0
            notes[b] = "torch on " + ("cuda" if torch.cuda.is_available() else "cpu") \
                if b == "torch" else ""
        ref = ids.get("faiss-cpu", ids.get("faiss-gpu"))
        for b in backends:
            if b not in times:
                print(f"{n:>9}  {b:<12} {'-':>9} {'-':>11} {'-':>6}  {notes[b]}")
                continue
            ratio = f"{times['sklearn'] / times[b]:.1f}x" if "sklearn" in times else "-"
            agree = f"{agreement(ids[b], ref):.3f}" if ref is not None else "-"
            print(f"{n:>9}  {b:<12} {times[b]:>9.2f} {ratio:>11} {agree:>6}  {notes[b]}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
