"""Aggregate stage: every run's metrics JSON into the one comparison table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.io import atomic_path, read_json

COLUMNS = [
    "dataset", "run", "stage", "latent", "metric", "variant", "seed", "top1", "knn_top1",
    "purity_at_1", "purity_at_k", "feature_dim", "epochs", "train_seconds", "eval_seconds",
    "device", "n_train", "n_test",
]
STAGE_ORDER = {"pixels": 0, "latent": 1, "byol": 2}


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """One row per metrics JSON, the documented columns first, sorted stage, run, seed."""
    rows = []
    for p in paths:
        row = read_json(p)
        rows.append({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = pd.NA
    df["seed"] = df["seed"].astype("Int64")
    df = df[COLUMNS + sorted(set(df.columns) - set(COLUMNS))]
    order = df["stage"].map(STAGE_ORDER).fillna(9)
    return (df.assign(_o=order).sort_values(["dataset", "_o", "run", "seed"])
            .drop(columns="_o").reset_index(drop=True))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of top1 and knn_top1 over seeds, per dataset and run."""
    g = df.groupby(["dataset", "run", "stage"], sort=False)
    out = g.agg(top1_mean=("top1", "mean"), top1_std=("top1", "std"),
                knn_top1_mean=("knn_top1", "mean"), seeds=("top1", "size")).reset_index()
    out["top1_std"] = out["top1_std"].fillna(0.0)
    return out


def aggregate(inputs: list[str | Path], out: str | Path) -> pd.DataFrame:
    df = collect(inputs)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    return df
