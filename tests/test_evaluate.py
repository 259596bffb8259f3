"""Linear probe and kNN accuracy on features whose answer is known."""

import numpy as np
import pandas as pd

from pipeline.aggregate import aggregate
from pipeline.evaluate import EvaluateParams, evaluate, knn_accuracy, linear_probe
from pipeline.io import read_json
from pipeline.prepare import PrepareParams, prepare


def blobs(n, seed, spread):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.eye(3, 8) * 5
    return centres[y] + rng.normal(0, spread, (n, 8)), y


def test_probe_separable_vs_noise():
    x, y = blobs(150, 0, 0.5)
    xt, yt = blobs(60, 1, 0.5)
    assert linear_probe(x, y, xt, yt) == 1.0
    assert knn_accuracy(x, y, xt, yt, 5) == 1.0
    noise = np.random.default_rng(2).normal(size=x.shape)
    assert linear_probe(noise, y, np.random.default_rng(3).normal(size=xt.shape), yt) < 0.6


def test_knn_votes_by_majority():
    train = np.array([[1.0, 0], [1.0, 0.1], [0, 1.0], [-1.0, 0]])
    labels = np.array([0, 0, 1, 2])
    assert knn_accuracy(train, labels, np.array([[1.0, 0.05]]), np.array([0]), k=3) == 1.0


def test_pixel_row_on_digits(tmp_path):
    prepare(PrepareParams(), tmp_path / "d.npz")
    row = evaluate(EvaluateParams(), "pixels", tmp_path / "d.npz", tmp_path / "d.npz",
                   tmp_path / "pixels.json", dataset="digits")
    assert read_json(tmp_path / "pixels.json")["top1"] == row["top1"]
    assert row["stage"] == "pixels" and row["run"] == "pixels"
    assert 0.93 < row["top1"] <= 1.0
    assert row["n_train"] + row["n_test"] == 1797
    table = aggregate([tmp_path / "pixels.json"], tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns[:8]) == ["dataset", "run", "stage", "latent", "metric", "variant",
                                     "seed", "top1"]
    assert csv.loc[0, "top1"] == round(row["top1"], 4)
    assert len(table) == 1


def test_purity_joins_only_rows_with_that_space_and_metric(tmp_path):
    from pipeline.aggregate import add_purity, collect
    from pipeline.io import write_json

    rows = [("pixels", None), ("latent-vae", None), ("byol-baseline", 0), ("byol-untrained", 0),
            ("byol-weighted-vae-cosine", 0), ("byol-weighted-ae-cosine", 0)]
    paths = []
    for run, seed in rows:
        from pipeline.config import parse_run_name

        p = tmp_path / f"{run}.json"
        write_json(p, {"dataset": "d", "run": run, **parse_run_name(run), "seed": seed,
                       "top1": 0.5})
        paths.append(p)
    purity = pd.DataFrame({"space": ["vae", "vae"], "metric": ["cosine", "euclidean"],
                           "purity_at_1": [0.9, 0.8], "purity_at_k": [0.7, 0.6]})
    df = add_purity(collect(paths), purity).set_index("run")
    assert df.loc["byol-weighted-vae-cosine", "purity_at_1"] == 0.9
    assert df.loc["byol-weighted-vae-cosine", "purity_at_k"] == 0.7
    assert pd.isna(df.loc["byol-weighted-ae-cosine", "purity_at_1"])  # no such neighbours
    assert pd.isna(df.loc["latent-vae", "purity_at_1"])
    assert list(df.index) == ["pixels", "latent-vae", "byol-untrained", "byol-baseline",
                              "byol-weighted-ae-cosine", "byol-weighted-vae-cosine"]


def test_atomic_writes_leave_no_temp_file_and_honour_umask(tmp_path):
    import os

    from pipeline.io import atomic_path, write_json

    out = tmp_path / "x.json"
    write_json(out, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    try:
        with atomic_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_latent_features_align_by_id_and_reject_other_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from pipeline import PipelineError
    from pipeline.evaluate import latent_features
    from pipeline.io import load_prepared

    prepare(PrepareParams(name="synthetic"), tmp_path / "d.npz")
    data = load_prepared(tmp_path / "d.npz")
    order = np.random.default_rng(0).permutation(len(data.ids))
    vectors = np.stack([data.ids, -data.ids], 1).astype(np.float32)[order]

    def write(ids):
        pq.write_table(pa.table({"id": ids, "latent": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), 2)}), tmp_path / "l.parquet")

    write(data.ids[order])
    feats, _ = latent_features(tmp_path / "l.parquet", data)
    np.testing.assert_array_equal(feats[:, 0], data.ids.astype(np.float32))
    wrong = data.ids[order].copy()
    wrong[3] = 10**6
    write(wrong)
    with pytest.raises(PipelineError, match="ids do not match the prepared data set"):
        latent_features(tmp_path / "l.parquet", data)
