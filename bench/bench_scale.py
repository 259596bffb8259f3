"""Memory and time of each stage against the number of images (synthetic 32x32x3 sets).

Every stage runs as the pipeline's own command in a child process, as a Snakemake job would;
the figures are its wall time, its peak resident memory (``ru_maxrss`` of that child, which
counts pages of the memory-mapped images it touched) and its peak anonymous memory (sampled
``RssAnon``: what the process itself allocated, which the kernel cannot drop by evicting
file pages). Stages: ``prepare`` (synthetic gratings), ``train`` (one BYOL epoch with the
images resident and streamed, smallconv, batch 256), ``neighbours`` (FAISS on 64-d latents
written by this script) and ``evaluate`` (the untrained encoder's features, linear probe and
weighted kNN).

    .venv/bin/python bench/bench_scale.py --sizes 25000 100000 400000 1000000

Results go in docs/BENCHMARKS.md ("Data larger than memory").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS and peak anonymous RSS (GiB)."""
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    peak_anon = [0]

    def sample():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            except OSError:
                break
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n"
                         + log.read_text()[-2000:])
    return {"seconds": round(time.time() - start, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "peak_anon_gib": round(peak_anon[0] / 2**20, 3)}


def pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--threads", str(os.cpu_count()), *args]


def write_latents_for(data: Path, out: Path, dim: int = 64) -> None:
    """Stand-in latents (class signal plus noise) for the neighbour search, in chunks."""
    from pipeline.io import load_prepared, write_latents

    prepared = load_prepared(data)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(len(prepared.classes), 1), dim)).astype(np.float32)
    x = centres[np.maximum(prepared.labels, 0)] + rng.normal(
        scale=2.0, size=(len(prepared.ids), dim)).astype(np.float32)
    write_latents(out, prepared, x, {"model": "ae", "dimension": str(dim)})


def bench_size(n: int, args, work: Path) -> dict:
    from pipeline.io import load_prepared

    d = work / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    data, row = d / "prepared", {"images": n}
    per_class = n // 10
    if "prepare" in args.stages or not data.exists():
        shutil.rmtree(data, ignore_errors=True)
        params = {"name": "synthetic", "synthetic.classes": 10, "synthetic.per_class": per_class,
                  "synthetic.size": 32, "synthetic.channels": 3}
        row["prepare"] = measure(pipeline("prepare", "--params", json.dumps(params),
                                          "--out", str(data)), d / "prepare.log")
    prepared = load_prepared(data)
    row["images_gib"] = round(prepared.images.nbytes / 2**30, 3)
    if "train" in args.stages:
        feeds = [f for f in ("resident", "streamed") if f in args.feeds]
        for i, feed in enumerate(feeds * args.repeats):
            share = 1.0 if feed == "resident" else 1e-9
            key = f"train_{feed}" + (f"_{i // len(feeds) + 1}" if args.repeats > 1 else "")
            t = d / f"train-{feed}"
            shutil.rmtree(t, ignore_errors=True)
            params = {"backbone": "smallconv", "epochs": 1, "warmup_epochs": 0,
                      "batch_size": 256, "device_memory_share": share,
                      "checkpoint_every": 1}
            row[key] = measure(pipeline(
                "train", "--params", json.dumps(params), "--method", "byol", "--seed", "0",
                "--device", "cpu", "--data", str(data), "--out", str(t / "encoder.pt"),
                "--state", str(t / "state.pt"), "--history", str(t / "history.csv"),
                "--loss-plot", str(t / "loss.png")), d / f"train-{feed}.log")
            hist = (t / "history.csv").read_text().splitlines()
            cols = hist[0].split(",")
            row[key]["images_per_s"] = float(
                hist[-1].split(",")[cols.index("images_per_s")])
    if "neighbours" in args.stages:
        latents = d / "latents.parquet"
        if not latents.exists():
            write_latents_for(data, latents)
        row["neighbours"] = measure(pipeline(
            "neighbours", "--params", json.dumps(
                {"k": 10, "index": "exact" if n <= args.exact_up_to else "ivf"}),
            "--metric", "cosine",
            "--device", "cpu", "--source", str(latents), "--data", str(data),
            "--out", str(d / "neighbours.parquet"), "--grid", str(d / "grid.png")),
            d / "neighbours.log")
    if "evaluate" in args.stages:
        enc = d / "untrained.pt"
        subprocess.run(pipeline("untrained", "--backbone", "smallconv", "--seed", "0",
                                "--data", str(data), "--out", str(enc)), check=True,
                       cwd=ROOT, capture_output=True)
        row["evaluate"] = measure(pipeline(
            "evaluate", "--params", json.dumps({"knn_k": [20]}), "--run", "untrained",
            "--dataset", "synthetic", "--device", "cpu", "--source", str(enc), "--data",
            str(data), "--out", str(d / "eval.json")), d / "evaluate.log")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000, 400_000,
                                                              1_000_000])
    ap.add_argument("--stages", nargs="+", default=["prepare", "train", "neighbours",
                                                    "evaluate"],
                    choices=["prepare", "train", "neighbours", "evaluate"])
    ap.add_argument("--feeds", nargs="+", default=["resident", "streamed"],
                    choices=["resident", "streamed"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nnbyol-scale"))
    ap.add_argument("--keep", action="store_true", help="keep each size's files")
    ap.add_argument("--exact-up-to", type=int, default=100_000,
                    help="exact neighbour search up to this many images, IVF above")
    ap.add_argument("--repeats", type=int, default=1,
                    help="train each feed this many times, alternating (paired A/B)")
    args = ap.parse_args(argv)
    print(f"# {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}", flush=True)
    for n in args.sizes:
        row = bench_size(n, args, args.workdir)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
