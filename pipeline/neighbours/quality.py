"""How good a kNN graph is: label purity, hubness, the purity table and its quality gate."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import atomic_path
from pipeline.latent.collapse import SPREAD_MIN

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


def graph_stats(labels: np.ndarray, neighbour_index: np.ndarray) -> dict[str, float | int]:
    """Purity at 1 and k and hubness of a kNN graph over ``labels`` (N,), as metadata keys.

    Args:
        labels: (N,) int labels, unknown < 0.
        neighbour_index: (N, k) neighbour positions in [0, N).
    """
    p1, pk = purity(labels, labels[neighbour_index])
    hub_max, orphans = hubness(neighbour_index, len(labels))
    return {"purity_at_1": p1, "purity_at_k": pk, "hub_max_in_degree": hub_max,
            "hub_orphan_fraction": orphans}


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
              f"{row.flag_reason}; runs mining it are flagged in the results table",
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
