"""Where a small job's seconds go: the interpreter, the imports, the work.

Every figure is a fresh child process, as a Snakemake job is one: its wall seconds and its
CPU seconds (user + system, from ``wait4``), the median of ``--repeats`` runs. First the
interpreter alone and the imports the stages pull in (torch's optimizers import
``torch._dynamo`` when built, so a training pays for it too); then the evaluation of
``--seeds`` untrained encoders on digits, one process per seed (the old ``evaluate_train``
job) against one process for all of them (the job now).

    .venv/bin/python bench/bench_startup.py --repeats 3 --seeds 3

Results go in docs/BENCHMARKS.md ("Where a small job's seconds go").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORTS = {
    "interpreter (python -c pass)": "pass",
    "the stage CLI (pipeline.__main__)": "import pipeline.__main__",
    "numpy": "import numpy",
    "pandas + pyarrow.parquet": "import pandas, pyarrow.parquet",
    "faiss": "import faiss",
    "matplotlib.pyplot": "import matplotlib.pyplot",
    "scikit-learn (linear_model)": "import sklearn.linear_model",
    "torch": "import torch",
    "torch + torch._dynamo (an optimizer, when built)": "import torch, torch._dynamo",
    "torchvision": "import torchvision",
}


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def median(cmd: list[str], repeats: int) -> tuple[float, float]:
    runs = [run(cmd) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def evaluate_cmd(sources: list[Path], outs: list[Path], seeds: list[int], data: Path) -> list:
    return [sys.executable, "-m", "pipeline", "--threads", "1", "evaluate", "--run", "untrained",
            "--dataset", "bench", "--device", "cpu", "--data", str(data),
            "--params", '{"max_iter": 1000}', "--seed", *map(str, seeds),
            "--source", *map(str, sources), "--out", *map(str, outs)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--seeds", type=int, default=3, help="encoders evaluated per run")
    ap.add_argument("--dataset", default="digits", choices=["digits", "synthetic"],
                    help="the evaluated set (synthetic: 24 tiny images, for the smoke test)")
    args = ap.parse_args(argv)

    from pipeline.prepare import PrepareParams, SyntheticParams, prepare
    from pipeline.train.encoder import write_untrained

    print(f"# python {sys.version.split()[0]}, {os.cpu_count()} cores, median of "
          f"{args.repeats} fresh processes; CPU = user + system seconds")
    print(f"{'what':<56} {'wall s':>7} {'CPU s':>7}")
    for name, code in IMPORTS.items():
        wall, cpu = median([sys.executable, "-c", code], args.repeats)
        print(f"{'import ' + name if code != 'pass' else name:<56} {wall:7.2f} {cpu:7.2f}",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "prepared"
        if args.dataset == "digits":
            prepare(PrepareParams(name="digits"), data)
        else:
            prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
                classes=3, per_class=8, size=12, channels=3)), data)
        seeds = list(range(args.seeds))
        sources = [tmp / f"encoder{s}.pt" for s in seeds]
        for seed, path in zip(seeds, sources, strict=True):
            write_untrained("smallconv", seed, data, path)
        outs = [tmp / f"seed{s}.json" for s in seeds]
        apart = [median(evaluate_cmd([src], [out], [s], data), args.repeats)
                 for src, out, s in zip(sources, outs, seeds, strict=True)]
        wall_apart, cpu_apart = sum(w for w, _ in apart), sum(c for _, c in apart)
        wall_one, cpu_one = median(evaluate_cmd(sources, outs, seeds, data), args.repeats)
    n = args.seeds
    print(f"{f'evaluate {n} encoders, one process each':<56} {wall_apart:7.2f} {cpu_apart:7.2f}")
    print(f"{f'evaluate {n} encoders in one process':<56} {wall_one:7.2f} {cpu_one:7.2f}")
    print(f"one process / one each: wall {wall_one / wall_apart:.2f}x, "
          f"CPU {cpu_one / cpu_apart:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
