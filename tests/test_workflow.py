"""The Snakemake DAG end to end on a tiny config: outputs, caching and re-run triggers."""

import os
import time

import pandas as pd
import pytest
from conftest import tiny_config

from pipeline.io import read_latents

pytestmark = pytest.mark.slow

# Two latent models, one metric, every variant: each rule runs, the grid stays small.
GRID = {"latent": {"models": ["ae", "vae"]}, "neighbours": {"metrics": ["cosine"]}}


def touch_later(path):
    """Edit a file so its mtime is clearly newer than the outputs."""
    later = time.time() + 5
    path.write_text(path.read_text() + "\n# edited\n")
    os.utime(path, (later, later))


def test_tiny_dag_runs_and_caches(workflow):
    workflow.write_config(tiny_config(**GRID))
    workflow.run()
    table = pd.read_csv(workflow.path / "results" / "linear_eval.csv")
    assert {"dataset", "run", "stage", "method", "variant", "source", "latent", "metric", "round",
            "seed", "top1"} <= set(table.columns)
    assert list(table["run"]) == [
        "pixels", "latent-ae", "latent-vae", "untrained", "byol-baseline",
        "byol-probabilistic-ae-cosine", "byol-probabilistic-vae-cosine",
        "byol-weighted-ae-cosine", "byol-weighted-vae-cosine",
    ]
    assert table["top1"].between(0, 1).all()
    byol = table[table["stage"] == "byol"].set_index("run")
    assert (byol["seed"] == 0).all()
    assert byol.loc["byol-weighted-vae-cosine", ["method", "variant", "source", "latent", "metric",
                                                 "round"]].tolist() == [
        "byol", "weighted", "latent", "vae", "cosine", 1]
    assert byol.loc["byol-baseline", ["method", "variant"]].tolist() == ["byol", "baseline"]
    assert byol.loc["byol-baseline", ["source", "latent", "metric", "round"]].isna().all()
    assert table.set_index("run").loc["untrained", "stage"] == "untrained"
    assert table.set_index("run").loc["latent-vae", ["stage", "latent"]].tolist() == [
        "latent", "vae"]
    assert byol.loc["byol-weighted-vae-cosine", "purity_at_1"] >= 0
    assert pd.isna(byol.loc["byol-baseline", "purity_at_1"])
    ds = workflow.path / "results" / "synthetic"
    for figure in ("latent/vae/recon.png", "neighbours/pixels-cosine/grid.png",
                   "train/byol-weighted-ae-cosine/seed0/loss.png", "train_histories.png"):
        assert (ds / figure).stat().st_size > 1000, figure
    assert (ds / "accuracy.png").exists() and (ds / "summary.csv").exists()
    # Nothing to do after a complete run.
    assert workflow.planned() == {}
    # The opt-in embed target: a finished run's features in the latents schema.
    features = ds / "train" / "byol-weighted-ae-cosine" / "seed0" / "features.parquet"
    workflow.run(str(features.relative_to(workflow.path)))
    ids, feats, meta = read_latents(features)
    assert meta["model"] == "byol-weighted-ae-cosine" and len(ids) == len(feats) > 0
    # latent.on_collapse only says what a collapse does: it re-runs nothing.
    workflow.write_config(tiny_config(latent={**GRID["latent"], "on_collapse": "warn"},
                                      neighbours=GRID["neighbours"]))
    assert workflow.planned() == {}
    # Settings that do not change results never re-run finished jobs.
    workflow.write_config(tiny_config(
        latent=GRID["latent"], neighbours={**GRID["neighbours"], "chunk_size": 5},
        train={"checkpoint_every": 7}))
    assert workflow.planned() == {}
    # Nor does training a run's seeds in one job: the same trainings, cut differently.
    workflow.write_config(tiny_config(**GRID, train={"seeds_in_one_job": True}))
    assert workflow.planned() == {}
    # Dropping the untrained control re-trains and re-evaluates nothing: only the tables
    # and figures, which lose its rows, are redone.
    workflow.write_config(tiny_config(**GRID, evaluate={"untrained": False}))
    assert set(workflow.planned()) <= {"aggregate", "figures", "combine"}
    workflow.write_config(tiny_config(**GRID))

    # One latent model's params re-run only that model's branch.
    workflow.write_config(tiny_config(**{**GRID, "latent": {**GRID["latent"],
                                                            "vae": {"beta": 2.0}}}))
    planned = workflow.planned()
    assert planned["train_latent"] == 1 and planned["export_latents"] == 1
    # The two vae runs (probabilistic, weighted), never the baseline or the ae runs.
    assert planned["neighbours"] == 1 and planned["train"] == 2
    assert planned["evaluate_train"] == 2
    assert "prepare" not in planned and "untrained" not in planned
    assert "evaluate_pixels" not in planned
    workflow.run("--dry-run", "--printshellcmds")  # still a valid plan
    workflow.write_config(tiny_config(**GRID))

    # A neighbour use's own param re-runs only that use's runs (weighted, ae and vae).
    workflow.write_config(tiny_config(**GRID, train={"weighted": {"pos_weight": 0.25}}))
    planned = workflow.planned()
    assert planned.get("train") == 2 and planned.get("evaluate_train") == 2
    assert "train_latent" not in planned and "neighbours" not in planned

    # An evaluation param re-runs only evaluation and aggregation.
    workflow.write_config(tiny_config(**GRID, evaluate={"C": 0.5}))
    planned = workflow.planned()
    assert planned and set(planned) <= {"evaluate_pixels", "evaluate_latent", "evaluate_train",
                                        "aggregate", "figures", "combine"}
    assert "prepare" not in planned
    workflow.run()

    # A data param re-runs everything downstream of the data.
    workflow.write_config(tiny_config(**GRID, evaluate={"C": 0.5}, seed=1))
    planned = workflow.planned()
    assert planned.get("prepare") == 1 and "evaluate_pixels" in planned and "aggregate" in planned

    # Editing a stage's own source re-runs that stage (and what depends on it).
    workflow.write_config(tiny_config(**GRID, evaluate={"C": 0.5}))
    touch_later(workflow.path / "pipeline" / "evaluate.py")
    planned = workflow.planned()
    assert "prepare" not in planned and "evaluate_pixels" in planned
    assert "train_latent" not in planned and "train" not in planned
    touch_later(workflow.path / "pipeline" / "latent" / "models.py")
    planned = workflow.planned()
    # Both latent models and the four neighbour runs downstream; not the baseline.
    assert planned["train_latent"] == 2 and planned["train"] == 4


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


def test_an_image_folder_with_unlabeled_images_and_no_test_folder_runs_end_to_end(workflow):
    """train/<class>/ and unlabeled/ only: test_fraction holds out labelled images, the
    unlabeled ones train and are mined for neighbours, the evaluation reads the labelled
    part, and every vector table carries the image files' paths."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    root = workflow.path / "data" / "mine"
    rng = np.random.default_rng(0)
    for c, level in (("dark", 40), ("light", 200)):
        (root / "train" / c).mkdir(parents=True)
        for i in range(20):
            img = np.clip(rng.normal(level, 20, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "train" / c / f"{i:02d}.png")
    (root / "unlabeled").mkdir()
    for i in range(30):
        img = rng.integers(0, 255, (12, 12), dtype=np.uint8)
        Image.fromarray(img).save(root / "unlabeled" / f"u{i:02d}.png")
    workflow.write_config(tiny_config(
        dataset={"name": "imagefolder", "root": "data/mine", "test_fraction": 0.25},
        latent={"models": ["ae"]}, neighbours={"metrics": ["cosine"], "pixels": False},
        train={"uses": ["baseline", "weighted"]}))
    workflow.run()
    ds = workflow.path / "results" / "imagefolder"
    meta = pq.read_table(ds / "prepared" / "meta.parquet").to_pandas()
    assert meta.groupby("split").size().to_dict() == {"test": 10, "train": 30, "unlabeled": 30}
    assert (meta.loc[meta["split"] == "unlabeled", "label"] == -1).all()
    assert meta.loc[meta["split"] == "unlabeled", "path"].str.match(r"unlabeled/u\d\d\.png").all()
    table = pd.read_csv(ds / "linear_eval.csv")
    assert (table["n_train"] == 30).all() and (table["n_test"] == 10).all()
    assert table["top1"].between(0, 1).all()
    nb = pq.read_table(ds / "neighbours" / "ae-cosine" / "neighbours.parquet").to_pandas()
    assert len(nb) == 60  # labelled and unlabeled training images are mined
    latents = pq.read_table(ds / "latent" / "ae" / "latents.parquet").to_pandas()
    paths = dict(zip(meta["id"], meta["path"], strict=True))
    assert [paths[i] for i in latents["id"]] == latents["path"].tolist()
    assert latents["path"].str.startswith(("train/", "unlabeled/")).all()
