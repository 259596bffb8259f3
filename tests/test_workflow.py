"""The Snakemake DAG end to end on a tiny config: outputs, caching and re-run triggers."""

import os
import time

import pandas as pd
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.slow


def touch_later(path):
    """Edit a file so its mtime is clearly newer than the outputs."""
    later = time.time() + 5
    path.write_text(path.read_text() + "\n# edited\n")
    os.utime(path, (later, later))


def test_tiny_dag_runs_and_caches(workflow):
    workflow.run()
    table = pd.read_csv(workflow.path / "results" / "linear_eval.csv")
    assert {"dataset", "run", "stage", "latent", "metric", "variant", "seed", "top1"} <= set(
        table.columns)
    assert "pixels" in set(table["run"])
    assert table["top1"].between(0, 1).all()
    assert (workflow.path / "results" / "synthetic" / "data.npz").exists()
    # Nothing to do after a complete run.
    assert workflow.planned() == {}

    # An evaluation param re-runs only evaluation and aggregation.
    workflow.write_config(tiny_config(evaluate={"C": 0.5}))
    planned = workflow.planned()
    assert planned and set(planned) <= {"evaluate_pixels", "evaluate_latent", "evaluate_byol",
                                        "evaluate_untrained", "aggregate"}
    assert "prepare" not in planned
    workflow.run()

    # A data param re-runs everything downstream of the data.
    workflow.write_config(tiny_config(evaluate={"C": 0.5}, seed=1))
    planned = workflow.planned()
    assert planned.get("prepare") == 1 and "evaluate_pixels" in planned and "aggregate" in planned

    # Editing a stage's own source re-runs that stage (and what depends on it).
    workflow.write_config(tiny_config(evaluate={"C": 0.5}))
    touch_later(workflow.path / "pipeline" / "evaluate.py")
    planned = workflow.planned()
    assert "prepare" not in planned and "evaluate_pixels" in planned


def test_bad_config_fails_before_any_job(workflow):
    workflow.write_config(tiny_config(latent={"dim": 0}))
    proc = workflow.run("--dry-run", check=False)
    assert proc.returncode != 0
    assert "config key 'latent.dim': 0 is less than the minimum of 1" in proc.stdout + proc.stderr
    assert not (workflow.path / "results").exists()


def test_missing_root_fails_before_any_job(workflow):
    workflow.write_config(tiny_config(dataset={"name": "imagefolder", "root": "data/none"}))
    proc = workflow.run(check=False)
    assert proc.returncode != 0
    assert "dataset.root 'data/none' does not exist" in proc.stdout + proc.stderr
    assert not (workflow.path / "results").exists()


def test_lint_is_clean(workflow):
    proc = workflow.run("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
