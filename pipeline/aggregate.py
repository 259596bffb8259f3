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
    # References first: pixels, latents, the untrained encoder, then the trained runs.
    order = df["stage"].map(STAGE_ORDER).fillna(9) + (df["run"] != "byol-untrained") * 0.5
    return (df.assign(_o=order).sort_values(["dataset", "_o", "run", "seed"])
            .drop(columns="_o").reset_index(drop=True))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of top1 and knn_top1 over seeds, per dataset and run."""
    g = df.groupby(["dataset", "run", "stage"], sort=False)
    out = g.agg(top1_mean=("top1", "mean"), top1_std=("top1", "std"),
                knn_top1_mean=("knn_top1", "mean"), seeds=("top1", "size")).reset_index()
    out["top1_std"] = out["top1_std"].fillna(0.0)
    return out


def add_purity(df: pd.DataFrame, purity: pd.DataFrame) -> pd.DataFrame:
    """Fill purity_at_1/purity_at_k of rows whose neighbours came from (latent, metric).

    Args:
        df: the collected table.
        purity: the neighbours stage's purity table (columns space, metric, purity_at_1,
            purity_at_k, ...).
    """
    lookup = {(r.space, r.metric): (r.purity_at_1, r.purity_at_k)
              for r in purity.itertuples(index=False)}
    df = df.copy()
    for col, i in (("purity_at_1", 0), ("purity_at_k", 1)):
        df[col] = pd.to_numeric(
            [lookup.get((lat, met), (None, None))[i] if isinstance(met, str) and met else None
             for lat, met in zip(df["latent"], df["metric"], strict=True)], errors="coerce")
    return df


def aggregate(
    inputs: list[str | Path], out: str | Path, purity: str | Path | None = None
) -> pd.DataFrame:
    """Write the comparison table: one row per metrics JSON, purity joined where it applies."""
    df = collect(inputs)
    if purity is not None:
        df = add_purity(df, pd.read_csv(purity))
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    return df
