"""The answer-first report: the verdict line, dot-and-interval charts, one type per CSV column
and the landing page's configuration (only keys that differ from the schema defaults)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from pipeline.aggregate import aggregate, summarise, verdict_line
from pipeline.io import write_json
from pipeline.train.grid import Run

WEIGHTED = Run("byol", "weighted", "latent", "vae", "cosine")


def _columns(run: str) -> dict:
    if run == "byol-baseline":
        return {"stage": "byol", **Run("byol").columns()}
    if run == WEIGHTED.name:
        return {"stage": "byol", **WEIGHTED.columns()}
    return {"stage": run}


def _summary(rows) -> pd.DataFrame:
    """summarise() of (run, seed, top1, knn20_top1) rows of data set ``d``."""
    return summarise(pd.DataFrame([
        {"dataset": "d", "run": run, **_columns(run), "seed": seed, "top1": top1,
         "knn20_top1": knn} for run, seed, top1, knn in rows]))


# Differences to the baseline on seeds 0 and 1: top-1 0.050 and 0.051 (mean 0.0505, sd
# 0.00070711, t_{0.975, 1} = 12.7062: half-width 12.7062 * 0.00070711 / sqrt(2) = 0.006353),
# kNN 0.05 and 0.06 (mean 0.055, sd 0.0070711: half-width 0.063531).
BETTER = [("pixels", None, 0.80, 0.70),
          ("byol-baseline", 0, 0.90, 0.80), ("byol-baseline", 1, 0.92, 0.80),
          (WEIGHTED.name, 0, 0.95, 0.85), (WEIGHTED.name, 1, 0.971, 0.86)]
# Differences 0.01 and 0.03 on both: mean 0.02, half-width 12.7062 * 0.014142 / sqrt(2).
SAME = [("pixels", None, 0.80, 0.70),
        ("byol-baseline", 0, 0.90, 0.80), ("byol-baseline", 1, 0.92, 0.80),
        (WEIGHTED.name, 0, 0.91, 0.81), (WEIGHTED.name, 1, 0.95, 0.83)]


def test_verdict_line_names_the_configuration_whose_interval_excludes_zero():
    assert verdict_line(_summary(BETTER)) == (
        "1 of 1 compared configuration differs from its baseline (95 % paired interval "
        "excludes 0): byol-weighted-vae-cosine vs byol-baseline (2 seed pairs): linear top-1 "
        "+0.0505 [+0.0441, +0.0569], knn20 top-1 +0.0550 [-0.0085, +0.1185]. "
        "Best mean linear top-1: byol-weighted-vae-cosine 0.9605.")


def test_verdict_line_says_no_configuration_differs():
    assert verdict_line(_summary(SAME)) == (
        "No configuration differs from its baseline: the 95 % paired interval of the "
        "linear-probe and kNN top-1 contains 0 for the one compared configuration. "
        "Best mean linear top-1: byol-weighted-vae-cosine 0.9300.")


def test_verdict_line_without_baseline_and_with_a_tie():
    s = _summary([("pixels", None, 0.9, 0.7), ("byol-baseline", 0, 0.9, 0.8)])
    assert verdict_line(s) == ("No configuration is compared with a baseline in this "
                               "experiment. Best mean linear top-1: 0.9000, tied between "
                               "pixels and byol-baseline.")


def test_verdict_counts_a_knn_interval_that_excludes_zero():
    # Linear top-1 differences 0.01, 0.03 (interval contains 0); kNN 0.100 and 0.101.
    s = _summary([("byol-baseline", 0, 0.90, 0.70), ("byol-baseline", 1, 0.92, 0.70),
                  (WEIGHTED.name, 0, 0.91, 0.80), (WEIGHTED.name, 1, 0.95, 0.801)])
    assert verdict_line(s).startswith(
        "1 of 1 compared configuration differs from its baseline (95 % paired interval "
        "excludes 0): byol-weighted-vae-cosine vs byol-baseline (2 seed pairs): linear top-1 "
        "+0.0200 [-0.1071, +0.1471], knn20 top-1 +0.1005 [+0.0941, +0.1069].")


def test_the_same_difference_on_every_seed_pair_is_named_but_not_counted():
    """Three seeds each +2 of 359 test images: sd 0, an interval of width 0 that judges
    nothing. The digits run of 2026-12-07 had one (kNN k=200 of byol-weighted-ae-cosine)."""
    two = 2 / 359
    rows = [("byol-baseline", s, 0.95 + s / 100, 0.90) for s in range(3)]
    rows += [(WEIGHTED.name, s, 0.95 + s / 100 + two, 0.90 + (0.01, -0.01, 0.0)[s])
             for s in range(3)]
    summary = _summary(rows)
    row = summary.set_index("run").loc[WEIGHTED.name]
    assert row["top1_diff"] == pytest.approx(two)
    assert row["top1_diff_ci95_high"] - row["top1_diff_ci95_low"] < 1e-12
    assert row["top1_verdict"] == "no spread: the same difference on every seed pair"
    assert verdict_line(summary) == (
        "No configuration differs from its baseline: the 95 % paired interval of the "
        "linear-probe and kNN top-1 contains 0 for the one compared configuration, where "
        "there is an interval. Not counted: the same difference on every seed pair, which "
        "leaves a t interval nothing to judge (more seeds can): byol-weighted-vae-cosine "
        "linear top-1 +0.0056 on each of 3 seed pairs. Best mean linear top-1: "
        "byol-weighted-vae-cosine 0.9656.")


def test_accuracy_chart_is_dots_with_intervals_on_an_axis_that_holds_them(tmp_path):
    from matplotlib.container import BarContainer

    from pipeline.figures import accuracy_chart

    s = _summary(SAME)
    fig = accuracy_chart(s, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    linear, knn = fig.axes[:2]
    assert "linear-probe top-1" in linear.get_xlabel() and "k=20" in knn.get_xlabel()
    for ax, col in ((linear, "top1"), (knn, "knn20_top1")):
        assert not any(isinstance(c, BarContainer) for c in ax.containers)
        assert not [p for p in ax.patches if p.get_width() > 0]  # no bars at all
        lowest = np.nanmin(np.r_[s[f"{col}_ci95_low"].clip(0, 1), s[f"{col}_mean"]])
        highest = np.nanmax(np.r_[s[f"{col}_ci95_high"].clip(0, 1), s[f"{col}_mean"]])
        left, right = ax.get_xlim()
        assert left < lowest and right > highest
        # The baseline's mean is marked with a vertical line.
        base = float(s.loc[s["run"] == "byol-baseline", f"{col}_mean"].iloc[0])
        assert any(line.get_label() == "byol-baseline mean" and
                   np.allclose(line.get_xdata(), base) for line in ax.get_lines())
    # One run (pixels) has no interval: an open dot, no error bar.
    assert s.loc[s["run"] == "pixels", "top1_ci95_low"].isna().all()


def test_accuracy_chart_draws_each_runs_interval_and_open_dots_without_one(tmp_path):
    """The dots are drawn a few per call (one call per colour): every run's mean and interval
    is still on the chart, at its own row, and a run without an interval is an open dot."""
    from pipeline.figures import accuracy_chart

    s = _summary(BETTER + [("untrained", 0, 0.85, 0.75), ("untrained", 1, 0.87, 0.74)])
    fig = accuracy_chart(s, tmp_path / "a.png")
    rows = dict(zip(s["run"], np.arange(len(s))[::-1], strict=True))
    for ax, col in zip(fig.axes[:2], ("top1", "knn20_top1"), strict=True):
        drawn = {}
        for c in ax.containers:  # each errorbar: the dots, and one bar per dot
            (x, y), bars = c.lines[0].get_data(), c.lines[2][0].get_segments()
            for xi, yi, bar in zip(x, y, bars, strict=True):
                drawn[int(yi)] = (xi, bar[0][0], bar[1][0])
        open_dots = {int(yi): xi for line in ax.get_lines() if line.get_mfc() == "white"
                     for xi, yi in zip(*line.get_data(), strict=True)}
        for r in s.itertuples():
            mean, low = getattr(r, f"{col}_mean"), getattr(r, f"{col}_ci95_low")
            if np.isnan(low):
                assert open_dots[rows[r.run]] == pytest.approx(mean)
                assert rows[r.run] not in drawn
            else:
                high = getattr(r, f"{col}_ci95_high")
                assert drawn[rows[r.run]] == pytest.approx((mean, max(low, 0), min(high, 1)))
                assert rows[r.run] not in open_dots


def test_t_interval_is_scipy_stats_t_without_importing_scipy_stats():
    """t_half_width's quantile (scipy.special.stdtrit) equals scipy.stats.t.ppf, and the
    aggregate stage need not import scipy.stats (about 2 s) for it."""
    import subprocess
    import sys

    from scipy import stats

    from pipeline.aggregate import t_half_width

    for n in range(2, 102):
        for level in (0.95, 0.9, 0.99):
            want = stats.t.ppf(0.5 + level / 2, n - 1) * 0.3 / np.sqrt(n)
            assert t_half_width(0.3, n, level) == pytest.approx(want, rel=1e-12, abs=0)
    assert np.isnan(t_half_width(0.3, 1)) and np.isnan(t_half_width(np.nan, 3))
    code = ("import sys; from pipeline.aggregate import t_half_width; t_half_width(1.0, 3); "
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def _evals(tmp_path, per_class: dict[tuple[str, int], list[float]]) -> list:
    paths = []
    for (run, seed), pc in per_class.items():
        paths.append(tmp_path / f"{run}-{seed}.json")
        write_json(paths[-1], {"run": run, "stage": "byol", "seed": seed,
                               "top1": float(np.mean(pc)), "per_class_top1": pc})
    return paths


def test_per_class_chart_calls_nothing_best_unless_its_interval_excludes_zero(tmp_path):
    from pipeline.figures import per_class_chart

    evals = _evals(tmp_path, {("byol-baseline", 0): [0.9, 0.9], ("byol-baseline", 1): [0.9, 1],
                              (WEIGHTED.name, 0): [0.9, 1.0], (WEIGHTED.name, 1): [1.0, 0.9]})
    fig = per_class_chart(evals, _summary(SAME), ["a", "b"], tmp_path / "same.png")
    title = fig._suptitle.get_text()
    assert "no configuration differs from its baseline" in title and "best" not in title
    assert (tmp_path / "same.png").stat().st_size > 1000
    fig = per_class_chart(evals, _summary(BETTER), ["a", "b"], tmp_path / "better.png")
    title = fig._suptitle.get_text()
    assert "byol-weighted-vae-cosine differs from byol-baseline" in title
    assert "no configuration differs" not in title
    # Per class: the paired difference over seeds with its interval, around a line at 0.
    assert fig.axes[1].get_ylim()[0] >= -1.05 and fig.axes[1].get_ylim()[1] <= 1.05


def test_csv_columns_read_back_with_one_type_each(tmp_path):
    """A latent export records its metadata as text ("2", "false"), a trained run typed
    values; a pixel row has neither. Each column comes back as one type."""
    prov = {"code_version": "0.1.0+abc", "torch": "2.14.1", "python": "3.11.7", "host": "h"}
    rows = [
        {"run": "pixels", "stage": "pixels", "seed": None, "top1": 0.8, "knn20_top1": 0.7,
         "eval_seconds": 1.5},
        {"run": "latent-vae", "stage": "latent", "latent": "vae", "seed": None, "top1": 0.7,
         "knn20_top1": 0.6, "epochs": "2", "train_seconds": "0.32", "eval_seconds": 1.25,
         "latent_collapsed": "false", "code_version": "0.1.0+old", "dimension": "4"},
        *({"run": run, **_columns(run), "seed": seed, "top1": top1, "knn20_top1": top1 - 0.1,
           "epochs": 2, "batch_size": 180, "collapsed": False, "train_seconds": 10.0 + seed,
           "eval_seconds": 2.0} for run, seed, top1 in (
               ("byol-baseline", 0, 0.9), ("byol-baseline", 1, 0.92),
               (WEIGHTED.name, 0, 0.95), (WEIGHTED.name, 1, 0.97)))]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"{i}.json")
        write_json(paths[-1], {"dataset": "d", "n_train": 10, "n_test": 5, **row,
                               "provenance": prov})
    aggregate(paths, tmp_path / "t.csv", summary=tmp_path / "s.csv")
    t = pd.read_csv(tmp_path / "t.csv", dtype_backend="numpy_nullable")
    assert str(t["batch_size"].dtype) == "Int64" and t["batch_size"].dropna().eq(180).all()
    for col in ("seed", "epochs", "n_train", "n_test", "dimension"):
        assert str(t[col].dtype) == "Int64", col
    for col in ("collapsed", "latent_collapsed"):
        assert str(t[col].dtype) == "boolean", col
    assert t["latent_collapsed"].dropna().tolist() == [False]
    plain = pd.read_csv(tmp_path / "t.csv")
    assert plain["n_train"].dtype == np.int64
    trained = pd.read_csv(tmp_path / "t.csv").dropna(subset=["batch_size"])
    assert set(trained["collapsed"]) == {False}
    # One spelling per type in the file: True/False, integers without decimals, 4 decimals
    # for accuracies, 2 for seconds.
    raw = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    assert set(raw["collapsed"]) == {"", "False"} and set(raw["latent_collapsed"]) == {
        "", "False"}
    assert set(raw["batch_size"]) == {"", "180"} and set(raw["epochs"]) == {"", "2"}
    assert raw["top1"].tolist() == ["0.8000", "0.7000", "0.9000", "0.9200", "0.9500",
                                    "0.9700"]
    assert raw["train_seconds"].tolist() == ["", "0.32", "10.00", "11.00", "10.00", "11.00"]
    # Time per run: training plus evaluation (evaluation alone where nothing was trained).
    assert raw["run_seconds"].tolist() == ["1.50", "1.57", "12.00", "13.00", "12.00", "13.00"]
    # Provenance on every row: a latent export's own code version, else the evaluation's.
    assert raw["code_version"].tolist() == ["0.1.0+abc", "0.1.0+old"] + ["0.1.0+abc"] * 4
    assert set(raw["torch"]) == {"2.14.1"} and set(raw["host"]) == {"h"}
    s = pd.read_csv(tmp_path / "s.csv", dtype_backend="numpy_nullable")
    assert str(s["n_seeds"].dtype) == "Int64" and str(s["n_pairs"].dtype) == "Int64"
    assert s.set_index("run").loc["byol-baseline", "run_seconds"] == pytest.approx(12.5)
    assert s.set_index("run").loc["byol-baseline", "code_version"] == "0.1.0+abc"
    raw = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False).set_index("run")
    assert raw.loc[WEIGHTED.name, "top1_diff"] == "0.0500"
    assert raw.loc[WEIGHTED.name, "n_pairs"] == "2" and raw.loc["pixels", "n_pairs"] == ""


def _changes(rst: str) -> dict[str, str]:
    """The landing page's literal block of changed keys: dotted key -> value text."""
    block = rst.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.match(r"^   ([\w.]+): (.*)$", line).groups() for line in block.splitlines())


def test_landing_page_shows_only_non_default_keys_and_the_tag_used():
    from pipeline.config import resolve_config
    from pipeline.experiments import config_rst

    config = resolve_config({"dataset": {"name": "imagefolder", "root": "data/mine"},
                             "train": {"epochs": 30, "seeds": [0, 1]},  # epochs: the default
                             "evaluate": {"knn_k": [20, 200]}})  # the default too
    rst = config_rst(config, "mine")
    assert rst.startswith("**Experiment** ``mine`` (the config file's name): results in "
                          "``results/mine/``.")
    assert _changes(rst) == {"dataset.name": '"imagefolder"', "dataset.root": '"data/mine"',
                             "train.seeds": "[0, 1]"}
    # The whole config, one click away (collapsed), with the tag as used; no key of a
    # source that is not used.
    full = rst.split("<details>", 1)[1]
    assert "</details>" in full and "  tag: \"mine\"" in full and "tag: null" not in rst
    assert "epochs: 30\n" in full and "seeds: [0, 1]  # default: [0, 1, 2]" in full
    assert "synthetic" not in rst and "stl10_unlabeled" not in rst and "download" not in rst
    assert "resize: null" in full  # an image folder's own key stays


def test_landing_page_marks_preset_keys_and_a_set_tag():
    from pipeline.config import resolve_config
    from pipeline.experiments import config_rst

    rst = config_rst(resolve_config({"dataset": {"name": "digits", "tag": "dig"}}), "dig")
    assert rst.startswith("**Experiment** ``dig`` (set by dataset.tag)")
    changes = _changes(rst)
    assert changes["train.batch_size"] == "64  (preset digits)"
    assert "dataset.name" not in changes and "dataset.tag" not in changes
    assert "root" not in rst and "synthetic" not in rst
