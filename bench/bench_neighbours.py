"""The matched neighbour benchmark: every trained run of one experiment against the baseline it
answers to, on the same data, budget and seeds (the pipeline's own DAG builds every run).

    .venv/bin/python bench/bench_neighbours.py --configfile config/digits-neighbours.yaml --run
    .venv/bin/python bench/bench_neighbours.py --configfile config/cifar10-cpu.yaml --run
    .venv/bin/python bench/bench_neighbours.py --configfile config/methods-digits.yaml

Prints the untrained control, then one block per training method (``train.methods``), its
baseline first: linear top-1 and weighted kNN top-1 (the smallest ``evaluate.knn_k``) as
mean +- std over seeds; the paired difference to the run's ``versus`` baseline on the same
seeds with its 95 % t-interval (a neighbour run against its own method's baseline, another
method's baseline against ``byol-baseline``, as summary.csv pairs them); the label purity of
the neighbours the run actually used (last epoch, mean over seeds); and the wall time of the
run's training per seed (``benchmarks/train/``). Without ``--run`` it only reads the tables
of a finished experiment.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import PipelineError  # noqa: E402
from pipeline.aggregate import KNN, knn_columns  # noqa: E402
from pipeline.config import METHODS, read_config_file, resolve_config  # noqa: E402
from pipeline.experiments import experiment_tag  # noqa: E402

# Stages that train nothing: the references in summary.csv that this table leaves out.
REFERENCES = ("pixels", "latent")


def results_dir(configfile: Path, root: Path = ROOT) -> Path:
    """results/<tag> of the experiment that ``configfile`` describes."""
    config = resolve_config(read_config_file(configfile))
    return root / "results" / experiment_tag(config, [configfile])


def wall_seconds(results: Path, run: str) -> float:
    """Mean wall seconds of ``run``'s training per seed, from the Snakemake benchmark files
    of its jobs: one per seed, or one for all its seeds (``train.seeds_in_one_job``), divided
    by the seeds it trained. NaN without any (the untrained control has none)."""
    folder = results / "benchmarks" / "train"
    if (folder / f"{run}.tsv").exists():
        seeds = len(list((results / "train" / run).glob("seed*/encoder.pt")))
        return pd.read_csv(folder / f"{run}.tsv", sep="\t")["s"].mean() / max(seeds, 1)
    seconds = [pd.read_csv(f, sep="\t")["s"].mean()
               for f in sorted(folder.glob(f"{run}-seed*.tsv"))
               if f.name.removeprefix(f"{run}-seed").removesuffix(".tsv").isdigit()]
    return sum(seconds) / len(seconds) if seconds else float("nan")


def _method_order(method) -> tuple[int, str]:
    if not isinstance(method, str) or not method:
        return -1, ""  # the untrained control first
    return (METHODS.index(method) if method in METHODS else len(METHODS)), method


def table(results: Path) -> pd.DataFrame:
    """One row per trained configuration and the untrained control, from summary.csv, the
    per-seed linear_eval.csv and the training jobs' benchmark files; grouped by method
    (registry order), each method's baseline first."""
    summary = pd.read_csv(results / "summary.csv")
    per_seed = pd.read_csv(results / "linear_eval.csv")
    rows = summary[~summary["stage"].isin(REFERENCES)].copy()
    runs = per_seed[~per_seed["stage"].isin(REFERENCES)].groupby("run")
    # Empty for runs without neighbour pairs (the column is absent when no run has any).
    rows["neighbour_purity"] = rows["run"].map(
        runs["neighbour_purity"].apply(lambda s: pd.to_numeric(s, errors="coerce").mean())
    ) if "neighbour_purity" in per_seed else float("nan")
    rows["wall_seconds"] = [wall_seconds(results, run) for run in rows["run"]]
    for col in ("method", "variant", "source", "versus"):
        rows[col] = rows[col].fillna("") if col in rows else ""
    key = [(*_method_order(m), v != "baseline", r)
           for m, v, r in zip(rows["method"], rows["variant"], rows["run"], strict=True)]
    return rows.iloc[sorted(range(len(rows)), key=key.__getitem__)]


def _pm(mean, std) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.3f} +- {0.0 if pd.isna(std) else std:.3f}"


def _diff(row, col) -> str:
    if pd.isna(row.get(f"{col}_diff")):
        return ""
    if pd.isna(row.get(f"{col}_diff_ci95_low")):
        return f"{row[f'{col}_diff']:+.3f} [n < 2]"
    return (f"{row[f'{col}_diff']:+.3f} [{row[f'{col}_diff_ci95_low']:+.3f}, "
            f"{row[f'{col}_diff_ci95_high']:+.3f}]")


def report(results: Path) -> str:
    rows = table(results)
    # The kNN accuracy of the smallest evaluate.knn_k (k = 20 by default).
    knn = [c for c in knn_columns(c.removesuffix("_mean") for c in rows.columns)
           if c.endswith("_top1")][:1]
    knn_name = f"kNN-{KNN.match(knn[0])[1]} top-1" if knn else "kNN top-1"
    methods = [m for m in dict.fromkeys(rows["method"]) if m]
    w = max([3, *rows["run"].str.len()])
    head = (f"{'run':<{w}} {'source':<7} {'versus':<16} {'seeds':>5} {'linear top-1':>15} "
            f"{'diff vs versus [95% CI]':>25} {knn_name:>15} {'kNN diff [95% CI]':>25} "
            f"{'purity':>6} {'wall s':>6}")
    lines = [f"# {results.name}: {len(rows)} configurations, methods {', '.join(methods)}; "
             "wall s: the training job (benchmarks/train), mean over seeds", head]
    for method, block in rows.groupby("method", sort=False):
        lines.append(f"## {method or 'untrained (control)'}")
        for _, r in block.iterrows():
            purity = "" if pd.isna(r["neighbour_purity"]) else f"{r['neighbour_purity']:.3f}"
            wall = "-" if pd.isna(r["wall_seconds"]) else f"{r['wall_seconds']:.0f}"
            lines.append(
                f"{r['run']:<{w}} {r['source'] or '-':<7} {r['versus'] or '-':<16} "
                f"{int(r['n_seeds']):>5} {_pm(r['top1_mean'], r['top1_std']):>15} "
                f"{_diff(r, 'top1'):>25} "
                + (f"{_pm(r[f'{knn[0]}_mean'], r[f'{knn[0]}_std']):>15} "
                   f"{_diff(r, knn[0]):>25} " if knn else f"{'-':>15} {'':>25} ")
                + f"{purity:>6} {wall:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", type=Path, required=True)
    ap.add_argument("--run", action="store_true", help="build the experiment first")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--root", type=Path, default=ROOT, help="the workflow's directory")
    args = ap.parse_args(argv)
    try:
        results = results_dir(args.configfile, args.root)
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    if args.run:
        start = time.time()
        subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--cores",
                        str(args.cores), "results/linear_eval.csv", "--configfile",
                        str(args.configfile.resolve())], cwd=args.root, check=True)
        print(f"# DAG wall time: {time.time() - start:.0f} s ({args.cores} cores)")
    if not (results / "summary.csv").is_file():
        raise SystemExit(f"error: {results / 'summary.csv'} does not exist: build the "
                         "experiment first (--run)")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
