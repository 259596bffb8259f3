"""The matched neighbour benchmark: baseline BYOL against every neighbour source x use of one
experiment, on the same data, budget and seeds (the pipeline's own DAG builds every run).

    .venv/bin/python bench/bench_neighbours.py --configfile config/digits-neighbours.yaml --run
    .venv/bin/python bench/bench_neighbours.py --configfile config/cifar10-cpu.yaml --run

Prints one row per configuration: linear top-1 and weighted kNN (k = 20) top-1 as mean +- std
over seeds; the paired difference to the baseline on the same seeds with its 95 % t-interval;
the label purity of the neighbours the run actually used (last epoch, mean over seeds); and the
training wall time per run. Without ``--run`` it only reads the tables of a finished run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import resolve_config  # noqa: E402
from pipeline.experiments import experiment_tag  # noqa: E402


def results_dir(configfile: Path, root: Path = ROOT) -> Path:
    """results/<tag> of the experiment that ``configfile`` describes."""
    config = resolve_config(yaml.safe_load(configfile.read_text()) or {})
    return root / "results" / experiment_tag(config, [configfile])


def table(results: Path) -> pd.DataFrame:
    """One row per BYOL configuration, from summary.csv and the per-seed linear_eval.csv."""
    summary = pd.read_csv(results / "summary.csv")
    per_seed = pd.read_csv(results / "linear_eval.csv")
    byol = summary[summary["stage"] == "byol"].copy()
    runs = per_seed[per_seed["stage"] == "byol"].groupby("run")
    byol["train_seconds"] = byol["run"].map(runs["train_seconds"].mean())
    byol["neighbour_purity"] = byol["run"].map(
        runs["neighbour_purity"].apply(lambda s: pd.to_numeric(s, errors="coerce").mean()))
    byol["source"] = byol["latent"].fillna("").replace("", "-")
    return byol


def _pm(mean, std) -> str:
    return f"{mean:.3f} +- {0.0 if pd.isna(std) else std:.3f}"


def _diff(row, col) -> str:
    if pd.isna(row.get(f"{col}_diff")):
        return ""
    return (f"{row[f'{col}_diff']:+.3f} [{row[f'{col}_diff_ci95_low']:+.3f}, "
            f"{row[f'{col}_diff_ci95_high']:+.3f}]")


def report(results: Path) -> str:
    rows = table(results)
    head = (f"{'run':<34} {'seeds':>5} {'linear top-1':>15} {'diff vs baseline [95% CI]':>27} "
            f"{'kNN-20 top-1':>15} {'kNN diff [95% CI]':>27} {'purity':>6} {'s/run':>6}")
    lines = [f"# {results.name}: {len(rows)} configurations", head]
    for _, r in rows.iterrows():
        purity = "" if pd.isna(r["neighbour_purity"]) else f"{r['neighbour_purity']:.3f}"
        lines.append(
            f"{r['run'].removeprefix('byol-'):<34} {int(r['n_seeds']):>5} "
            f"{_pm(r['top1_mean'], r['top1_std']):>15} {_diff(r, 'top1'):>27} "
            f"{_pm(r['knn20_top1_mean'], r['knn20_top1_std']):>15} "
            f"{_diff(r, 'knn20_top1'):>27} {purity:>6} {r['train_seconds']:>6.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", type=Path, required=True)
    ap.add_argument("--run", action="store_true", help="build the experiment first")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--root", type=Path, default=ROOT, help="the workflow's directory")
    args = ap.parse_args(argv)
    results = results_dir(args.configfile, args.root)
    if args.run:
        start = time.time()
        subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--cores",
                        str(args.cores), "results/linear_eval.csv", "--configfile",
                        str(args.configfile.resolve())], cwd=args.root, check=True)
        print(f"# DAG wall time: {time.time() - start:.0f} s ({args.cores} cores)")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
