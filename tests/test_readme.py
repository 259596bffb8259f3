"""The README's results excerpt is generated from a run's summary.csv and kept current."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
from conftest import ROOT

from pipeline import PipelineError
from pipeline.readme import END, excerpt, update_readme, written

KEPT = ROOT / "docs" / "results" / "digits-summary.csv"


def _row(run, stage, versus="", top1=0.9, diff=math.nan, low=math.nan, high=math.nan):
    return {"dataset": "d", "run": run, "stage": stage, "n_seeds": 3, "versus": versus,
            "top1_mean": top1, "top1_std": 0.01, "top1_diff": diff,
            "top1_diff_ci95_low": low, "top1_diff_ci95_high": high, "n_pairs": 3,
            "knn20_top1_mean": top1, "knn20_top1_std": 0.02, "knn20_top1_diff": diff,
            "knn20_top1_diff_ci95_low": low, "knn20_top1_diff_ci95_high": high}


def _summary():
    rows = [_row("pixels", "pixels"), _row("untrained", "untrained", top1=0.5),
            _row("byol-baseline", "byol", top1=0.95)]
    rows += [_row(f"byol-weighted-{i}", "byol", "byol-baseline", 0.95 + d, d, d - 0.01,
                  d + 0.01) for i, d in enumerate([0.02, -0.03, 0.0, 0.01, -0.01, 0.03])]
    return pd.DataFrame(rows)


def test_excerpt_shows_the_baseline_the_largest_differences_and_the_control():
    table = excerpt(_summary(), "docs/results/x.csv")
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == [
        "byol-baseline", "byol-weighted-5", "byol-weighted-0", "byol-weighted-3",
        "byol-weighted-2", "untrained"]
    assert "| `byol-baseline` | 3 | 0.9500 ± 0.0100 | (baseline) | 0.9500 ± 0.0200 |" in table
    assert "| +0.0300 [+0.0200, +0.0400] |" in table
    assert "| `untrained` | 3 | 0.5000 ± 0.0100 | (control) |" in table
    assert "6 of the 9 rows of `docs/results/x.csv`" in table


def test_readme_table_is_rewritten_then_current(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\nold\n" + END + "\nafter\n")
    summary = tmp_path / "summary.csv"
    _summary().to_csv(summary, index=False)
    keep = tmp_path / "kept" / "summary.csv"
    assert not update_readme(summary, readme, keep)
    assert keep.read_text() == summary.read_text()
    assert written(readme) == excerpt(_summary(), str(keep))
    assert readme.read_text().endswith(END + "\nafter\n")
    assert update_readme(summary, readme, keep, check=True)


def test_missing_summary_and_missing_block_are_one_line_errors(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    with pytest.raises(PipelineError, match="no such summary"):
        update_readme(tmp_path / "none.csv", readme, None)
    (tmp_path / "s.csv").write_text(_summary().to_csv(index=False))
    with pytest.raises(PipelineError, match="README has no"):
        update_readme(tmp_path / "s.csv", readme, None)


@pytest.mark.skipif(not KEPT.exists(), reason="no kept summary yet")
def test_the_readme_table_is_the_one_its_kept_summary_generates(tmp_path):
    """What README.md shows is regenerated from the summary.csv of the run it names."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert update_readme(KEPT, readme, "docs/results/digits-summary.csv", check=True), (
        "README.md's results table differs from docs/results/digits-summary.csv; "
        "run python -m pipeline readme-table results/digits/summary.csv")
