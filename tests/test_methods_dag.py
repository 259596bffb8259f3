"""The three training methods through the Snakemake DAG: one grid, refused grids, re-runs."""

import pandas as pd
import pytest
from conftest import Workflow, tiny_config

pytestmark = pytest.mark.slow

# One seed, two epochs, one latent space (ae, cosine), no raw-pixel neighbours.
BASE = {"latent": {"models": ["ae"]}, "neighbours": {"metrics": ["cosine"], "pixels": False}}
# Every method with every use and source it takes: byol all four uses, simclr baseline and
# probabilistic, nnclr its baseline only; latent neighbours in two refresh rounds and the queue.
EVERYTHING = {
    **BASE,
    "train": {"methods": ["byol", "simclr", "nnclr"],
              "uses": ["baseline", "probabilistic", "weighted", "topk"],
              "sources": ["latent", "queue"], "refresh_rounds": 2,
              "queue": {"queue_size": 32, "k": 3}, "topk": {"k": 3}},
    "nnclr": {"queue_size": 48},
}
COLUMNS = ["stage", "method", "variant", "source", "latent", "metric", "round"]
N = None  # an empty cell of the table


def neighbour_runs(method, use):
    """A neighbour use's three runs: latent ae-cosine, its refresh round 2, the queue."""
    return [(f"{method}-{use}-ae-cosine", method, method, use, "latent", "ae", "cosine", 1),
            (f"{method}-{use}-ae-cosine-r2", method, method, use, "refresh", "ae", "cosine", 2),
            (f"{method}-{use}-queue", method, method, use, "queue", N, N, N)]


# run, then COLUMNS, in the table's order: references, then the trained runs by name.
EXPECTED = [
    ("pixels", "pixels", N, N, N, N, N, N),
    ("latent-ae", "latent", N, N, N, "ae", N, N),
    ("untrained", "untrained", N, N, N, N, N, N),
    ("byol-baseline", "byol", "byol", "baseline", N, N, N, N),
    *neighbour_runs("byol", "probabilistic"),
    *neighbour_runs("byol", "topk"),
    *neighbour_runs("byol", "weighted"),
    ("nnclr-baseline", "nnclr", "nnclr", "baseline", N, N, N, N),
    ("simclr-baseline", "simclr", "simclr", "baseline", N, N, N, N),
    *neighbour_runs("simclr", "probabilistic"),
]


def _cells(df: pd.DataFrame) -> list[tuple]:
    """Rows as tuples, empty cells (NaN, <NA>, "") as None and whole rounds as int."""
    out = []
    for row in df.itertuples(index=False):
        out.append(tuple(None if pd.isna(v) or v == "" else int(v) if isinstance(v, float)
                         else v for v in row))
    return out


def test_three_methods_with_every_use_and_source_in_one_grid(tmp_path):
    wf = Workflow(tmp_path, tiny_config(**EVERYTHING))
    wf.run()
    ds = tmp_path / "results" / "synthetic"
    table = pd.read_csv(tmp_path / "results" / "linear_eval.csv")
    assert _cells(table[["run", *COLUMNS]]) == EXPECTED
    assert (table["dataset"] == "synthetic").all() and table["top1"].between(0, 1).all()
    assert (table.loc[table["method"].notna(), "seed"] == 0).all()
    # Refresh round 2 mined the neighbours of round 1's encoder, per method and use.
    for run in ("byol-weighted-ae-cosine-r2", "simclr-probabilistic-ae-cosine-r2"):
        assert (ds / "neighbours" / "refresh" / run / "seed0" / "neighbours.parquet").exists()
    # Each neighbour run against its own method's baseline; the other methods' baselines
    # against byol-baseline; the references against nothing.
    summary = pd.read_csv(ds / "summary.csv").set_index("run")
    versus = summary["versus"].fillna("").to_dict()
    assert list(versus) == [run for run, *_ in EXPECTED]
    expected = {run: "" if method is None or run == "byol-baseline" else
                "byol-baseline" if use == "baseline" else f"{method}-baseline"
                for run, _, method, use, *_ in EXPECTED}
    assert versus == expected
    assert summary.loc["simclr-probabilistic-queue", "versus"] == "simclr-baseline"
    assert summary.loc["nnclr-baseline", "n_pairs"] == 1
    assert (ds / "train_histories.png").stat().st_size > 1000
    assert wf.planned() == {}


# Grids that mean nothing, and the one line that refuses each before any job.
REFUSED = {
    "simclr-weighted": (
        {"train": {"methods": ["simclr"], "uses": ["weighted"]}},
        "error: config key 'train.uses': 'weighted' means nothing for train.methods "
        "['simclr'] (simclr takes ['baseline', 'probabilistic']); add byol to train.methods "
        "or drop 'weighted'"),
    "nnclr-probabilistic": (
        {"train": {"methods": ["nnclr"], "uses": ["probabilistic"]}},
        "error: config key 'train.uses': 'probabilistic' means nothing for train.methods "
        "['nnclr'] (nnclr takes ['baseline']); add byol or simclr to train.methods or drop "
        "'probabilistic'"),
    "old-layout": (
        {"byol": {"variants": ["baseline"]}},
        "error: config: the training keys moved from byol: to train: (shared by every method; "
        "byol: keeps only tau_base): byol.variants -> train.uses"),
    "nnclr-queue-below-batch": (
        {"train": {"methods": ["nnclr"], "uses": ["baseline"]}, "nnclr": {"queue_size": 16}},
        "error: config key 'nnclr.queue_size': 16 is smaller than the batch (32); the queue "
        "must hold at least one batch of earlier projections"),
    "simclr-temperature-0": (
        {"train": {"methods": ["simclr"], "uses": ["baseline"]}, "simclr": {"temperature": 0}},
        "error: config key 'simclr.temperature': 0 is less than or equal to the minimum of 0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_grid_fails_in_one_line_before_any_job(tmp_path, case):
    overrides, line = REFUSED[case]
    wf = Workflow(tmp_path, tiny_config(**{**BASE, **overrides}))
    proc = wf.run(check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors and errors[0] == line, proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_methods_own_key_re_runs_only_that_methods_runs(tmp_path):
    small = {**BASE, "train": {"methods": ["byol", "simclr"], "uses": ["baseline"]}}
    wf = Workflow(tmp_path, tiny_config(**small))
    wf.run()
    assert wf.planned() == {}
    downstream = {"evaluate_train": 1, "aggregate": 1, "figures": 1, "combine": 1}
    # simclr's temperature: simclr-baseline, its evaluation and the tables and figures.
    wf.write_config(tiny_config(**small, simclr={"temperature": 0.5}))
    assert wf.planned() == {"train": 1, **downstream}
    proc = wf.run("--dry-run", "--printshellcmds")
    assert "--method simclr --use baseline" in proc.stdout
    assert "--method byol" not in proc.stdout
    # byol's own key likewise re-runs byol-baseline only; nnclr's, not in the grid, nothing.
    wf.write_config(tiny_config(**small, byol={"tau_base": 0.9}))
    proc = wf.run("--dry-run", "--printshellcmds")
    assert wf.planned() == {"train": 1, **downstream}
    assert "--method byol --use baseline" in proc.stdout
    assert "--method simclr" not in proc.stdout
    wf.write_config(tiny_config(**small, nnclr={"temperature": 0.5}))
    assert wf.planned() == {}
