"""The README's results excerpt, generated from a run's ``summary.csv`` so it cannot drift.

``python -m pipeline readme-table results/digits/summary.csv`` rewrites the block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md and keeps the summary it
came from beside the docs (``docs/results/<tag>-summary.csv``); ``--check`` only compares.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from pipeline import PipelineError
from pipeline.aggregate import diff_text, knn_columns, mean_std_text, verdict_line
from pipeline.schema import METHODS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ROWS = 6


def _pick(summary: pd.DataFrame, rows: int) -> pd.DataFrame:
    """The baselines, then the compared configurations by linear top-1 difference (largest
    first) as many as fit, then the untrained control."""
    trained = summary[summary["stage"].isin(METHODS)]
    baselines = trained[trained["versus"].fillna("") == ""]
    compared = trained[trained["versus"].fillna("") != ""].sort_values(
        ["top1_diff", "run"], ascending=[False, True])
    control = summary[summary["run"] == "untrained"]
    room = max(0, rows - len(baselines) - len(control))
    return pd.concat([baselines, compared.head(room), control])


def excerpt(summary: pd.DataFrame, source: str, rows: int = ROWS) -> str:
    """A markdown table of ``rows`` configurations of ``summary`` (mean ± std over seeds and
    the seed-paired difference to the baseline with its 95 % interval, linear probe and the
    smallest-k weighted kNN), with the verdict line and where the numbers come from."""
    if summary.empty:
        raise PipelineError(f"{source} has no rows")
    means = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
    knn = next((c for c in knn_columns(means) if c.endswith("_top1")), None)
    picked = _pick(summary, rows)
    head = ["configuration", "seeds", "linear top-1", "Δ vs baseline [95 % CI]"]
    if knn:
        label = f"kNN (k={knn.removeprefix('knn').removesuffix('_top1')}) top-1"
        head += [label, "Δ kNN [95 % CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in picked.iterrows():
        versus = diff_text(r["top1_diff"], r["top1_diff_ci95_low"], r["top1_diff_ci95_high"])
        if r["run"] == "untrained":
            versus = "(control)"
        cells = [f"`{r['run']}`", str(int(r["n_seeds"])),
                 mean_std_text(r["top1_mean"], r["top1_std"]), versus or "(baseline)"]
        if knn:
            cells += [mean_std_text(r[f"{knn}_mean"], r[f"{knn}_std"]),
                      diff_text(r[f"{knn}_diff"], r[f"{knn}_diff_ci95_low"],
                                r[f"{knn}_diff_ci95_high"])]
        lines.append("| " + " | ".join(cells) + " |")
    shown = len(picked)
    return "\n".join([
        *lines, "",
        f"{shown} of the {len(summary)} rows of `{source}` (every row, with the raw-pixel and "
        "latent-space references: that file). " + verdict_line(summary),
    ])


def _block(text: str) -> tuple[int, int]:
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise PipelineError(f"README has no {BEGIN} ... {END} block")
    return start + len(BEGIN), stop


def written(readme: str | Path) -> str:
    """The excerpt the README holds now, without the markers."""
    text = Path(readme).read_text()
    start, stop = _block(text)
    return text[start:stop].strip("\n")


def update_readme(summary_csv: str | Path, readme: str | Path, keep: str | Path | None,
                  check: bool = False) -> bool:
    """Regenerate the README's excerpt from ``summary_csv``; returns whether it was already
    current. With ``check`` nothing is written; otherwise the README is rewritten and the
    summary copied to ``keep``, the file the README names as its source."""
    summary_csv, readme = Path(summary_csv), Path(readme)
    if not summary_csv.is_file():
        raise PipelineError(f"{summary_csv}: no such summary (run the experiment first)")
    source = str(keep) if keep is not None else str(summary_csv)
    table = excerpt(pd.read_csv(summary_csv), source)
    current = written(readme) == table
    if not check and not current:
        text = readme.read_text()
        start, stop = _block(text)
        readme.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    if not check and keep is not None and Path(keep).resolve() != summary_csv.resolve():
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary_csv, keep)
    return current
