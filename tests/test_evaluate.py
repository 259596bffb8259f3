"""Linear probe, weighted kNN, the seed summary and the combined table, against hand numbers."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import CountingImages

from pipeline.__main__ import main
from pipeline.aggregate import aggregate
from pipeline.evaluate import (
    EvaluateParams,
    accuracies,
    evaluate,
    linear_probe,
    sklearn_probe,
    torch_probe,
)
from pipeline.features import PixelMatrix, gather, pixel_features, select
from pipeline.io import read_json
from pipeline.knn import knn_scores, topk_correct, weighted_knn_scores
from pipeline.prepare import PrepareParams, prepare
from pipeline.train.grid import Run


def blobs(n, seed, spread):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.eye(3, 8) * 5
    return centres[y] + rng.normal(0, spread, (n, 8)), y


def test_probe_separable_vs_noise():
    x, y = blobs(150, 0, 0.5)
    xt, yt = blobs(60, 1, 0.5)
    assert topk_correct(linear_probe(x, y, xt, 3), yt, 1).all()
    assert topk_correct(weighted_knn_scores(x, y, xt, 3, 5), yt, 1).all()
    noise = np.random.default_rng(2).normal(size=x.shape)
    scores = linear_probe(noise, y, np.random.default_rng(3).normal(size=xt.shape), 3)
    assert topk_correct(scores, yt, 1).mean() < 0.6


def test_weighted_knn_by_hand():
    # Test point (1, 0.2). Cosine similarities to the training points: 0.98058 (label 0),
    # 0.19612 (1), 0.83205 (1), -0.98058 (2). With k = 3 and T = 0.5 the votes are
    # class 0: exp(0.98058 / 0.5) = 7.1076, class 1: exp(0.83205 / 0.5) + exp(0.19612 / 0.5)
    # = 5.2810 + 1.4802 = 6.7612: class 0 wins, where a majority vote would pick class 1.
    train = np.array([[1.0, 0], [0, 1.0], [1.0, 1.0], [-1.0, 0]])
    labels = np.array([0, 1, 1, 2])
    scores = weighted_knn_scores(train, labels, np.array([[1.0, 0.2]]), 3, k=3, temperature=0.5)
    np.testing.assert_allclose(scores, [[7.1076, 6.7612, 0.0]], rtol=1e-4)
    # k above the number of training images is capped: the fourth point votes too.
    scores = weighted_knn_scores(train, labels, np.array([[1.0, 0.2]]), 3, k=99, temperature=0.5)
    np.testing.assert_allclose(scores, [[7.1076, 6.7612, np.exp(-0.98058 / 0.5)]], rtol=1e-4)


def brute_force_knn(train_x, train_y, test_x, n_classes, k, t):
    """The protocol written out one test image at a time, in float64."""
    out = np.zeros((len(test_x), n_classes))
    for i, q in enumerate(test_x):
        sims = [float(q @ a / np.linalg.norm(q) / np.linalg.norm(a)) for a in train_x]
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:min(k, len(sims))]:
            out[i, train_y[j]] += np.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_weighted_knn_matches_brute_force(k):
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(120, 6)), rng.integers(0, 8, 120)
    xt, yt = rng.normal(size=(40, 6)), rng.integers(0, 8, 40)
    ours = weighted_knn_scores(x, y, xt, 8, k, 0.07, chunk=16)
    ref = brute_force_knn(x, y, xt, 8, k, 0.07)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    for top in (1, 5):
        expected = np.mean([yt[i] in np.argsort(-ref[i], kind="stable")[:top]
                            for i in range(len(yt))])
        assert topk_correct(ours, yt, top).mean() == expected


def test_topk_and_accuracy_columns():
    scores = np.array([[0.1, 0.5, 0.4, 0, 0, 0], [0.3, 0.3, 0.4, 0, 0, 0]])
    labels = np.array([2, 1])
    np.testing.assert_array_equal(topk_correct(scores, labels, 1), [False, False])
    np.testing.assert_array_equal(topk_correct(scores, labels, 2), [True, False])
    assert topk_correct(scores, labels, 3).all()  # ties go to the lower class index
    assert accuracies(scores, labels, 6) == {"top1": 0.0, "top5": 1.0}
    assert accuracies(scores[:, :5], labels, 5)["top5"] is None  # top-5 needs > 5 classes


def test_pixel_row_on_digits(tmp_path, capsys):
    prepare(PrepareParams(), tmp_path / "d.npz")
    row = evaluate(EvaluateParams(), "pixels", tmp_path / "d.npz", tmp_path / "d.npz",
                   tmp_path / "pixels.json", dataset="digits")
    assert read_json(tmp_path / "pixels.json")["top1"] == row["top1"]
    assert row["stage"] == "pixels" and row["run"] == "pixels"
    assert 0.93 < row["top1"] <= row["top5"] <= 1.0
    assert 0.93 < row["knn20_top1"] <= row["knn20_top5"]
    assert row["n_train"] + row["n_test"] == 1797
    assert len(row["per_class_top1"]) == 10 and len(row["pca_test"]["xy"]) == row["n_test"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"evaluate pixels: linear top-1 {row['top1']:.4f}, top-5 ")
    assert f"knn20 top-1 {row['knn20_top1']:.4f}, knn200 top-1" in line
    table = aggregate([tmp_path / "pixels.json"], tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns[:16]) == [
        "dataset", "run", "stage", "method", "variant", "source", "latent", "metric", "round",
        "seed", "top1", "top5", "knn20_top1", "knn20_top5", "knn200_top1", "knn200_top5"]
    assert csv.loc[0, "top1"] == round(row["top1"], 4)
    assert len(table) == 1


# The trained runs of these tables, as the grid names them.
TRAINED = {r.name: r for r in (
    Run("byol"), Run("simclr"), Run("nnclr"),
    Run("byol", "weighted", "latent", "vae", "cosine"),
    Run("byol", "weighted", "latent", "ae", "cosine"),
    Run("byol", "probabilistic", "latent", "vae", "cosine"),
    Run("simclr", "probabilistic", "latent", "vae", "cosine"),
)}


def _columns(run: str) -> dict:
    """A row's identifying columns as evaluate writes them: a trained run's from its
    checkpoint (stage = the method), the references' from what was evaluated."""
    if run in TRAINED:
        return {"stage": TRAINED[run].method, **TRAINED[run].columns()}
    if run.startswith("latent-"):
        return {"stage": "latent", "latent": run.removeprefix("latent-")}
    return {"stage": run}  # pixels, untrained


def _table(rows):
    return pd.DataFrame([{"dataset": "d", "run": run, **_columns(run), "seed": seed,
                          "top1": top1, "knn20_top1": knn} for run, seed, top1, knn in rows])


def test_summary_mean_std_and_paired_difference_by_hand():
    from pipeline.aggregate import summarise

    df = _table([
        ("pixels", None, 0.80, 0.70),
        ("byol-baseline", 0, 0.90, 0.80), ("byol-baseline", 1, 0.92, 0.80),
        ("byol-baseline", 2, 0.94, 0.80),
        ("byol-weighted-vae-cosine", 0, 0.91, 0.81), ("byol-weighted-vae-cosine", 1, 0.95, 0.82),
        ("byol-weighted-vae-cosine", 2, 0.94, 0.83),
        ("byol-probabilistic-vae-cosine", 1, 0.96, 0.90),  # one seed: no interval
        ("byol-weighted-ae-cosine", 0, 0.95, 0.81), ("byol-weighted-ae-cosine", 1, 0.97, 0.81),
        ("byol-weighted-ae-cosine", 5, 0.10, 0.10),  # seed 5 has no baseline: not a pair
    ])
    s = summarise(df).set_index("run")
    w = s.loc["byol-weighted-vae-cosine"]
    assert w["n_seeds"] == 3 and w["seeds"] == "0 1 2"
    # top1 0.91, 0.95, 0.94: mean 0.93333, sd sqrt(8.6667e-4 / 2) = 0.020817.
    assert w["top1_mean"] == pytest.approx(0.933333, abs=1e-6)
    assert w["top1_std"] == pytest.approx(0.020817, abs=1e-6)
    # Differences to the baseline on seeds 0, 1, 2: 0.01, 0.03, 0.00. Mean 0.013333, sd
    # 0.015275, t_{0.975, 2} = 4.302653: half-width 4.302653 * 0.015275 / sqrt(3) = 0.037946.
    assert w["top1_diff"] == pytest.approx(0.013333, abs=1e-6)
    assert w["top1_diff_ci95_low"] == pytest.approx(-0.024612, abs=1e-5)
    assert w["top1_diff_ci95_high"] == pytest.approx(0.051279, abs=1e-5)
    assert w["n_pairs"] == 3 and w["top1_verdict"] == "no significant difference"
    # kNN differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, half-width 4.302653 * 0.01 / sqrt(3).
    assert w["knn20_top1_diff"] == pytest.approx(0.02, abs=1e-9)
    assert w["knn20_top1_diff_ci95_low"] == pytest.approx(0.02 - 0.024841, abs=1e-5)
    p = s.loc["byol-probabilistic-vae-cosine"]
    assert p["n_pairs"] == 1 and p["top1_diff"] == pytest.approx(0.04)
    assert np.isnan(p["top1_diff_ci95_low"]) and p["top1_verdict"] == "n < 2: no interval"
    assert np.isnan(p["top1_std"])
    a = s.loc["byol-weighted-ae-cosine"]
    # Pairs on seeds 0 and 1 only: 0.05, 0.05; sd 0, so the interval is the point itself,
    # which judges nothing: not counted as better.
    assert a["n_pairs"] == 2 and a["top1_diff"] == pytest.approx(0.05)
    assert a["top1_diff_ci95_low"] == pytest.approx(0.05)
    assert a["top1_verdict"] == "no spread: the same difference on every seed pair"
    for ref in ("pixels", "byol-baseline"):
        assert pd.isna(s.loc[ref, "n_pairs"]) and np.isnan(s.loc[ref, "top1_diff"])
    assert s.loc["byol-baseline", "top1_mean"] == pytest.approx(0.92)


def test_summary_pairs_each_run_with_its_own_methods_baseline():
    from pipeline.aggregate import summarise

    df = _table([
        ("pixels", None, 0.80, 0.70),
        ("byol-baseline", 0, 0.90, 0.80), ("byol-baseline", 1, 0.92, 0.80),
        ("simclr-baseline", 0, 0.85, 0.75), ("simclr-baseline", 1, 0.86, 0.75),
        ("simclr-probabilistic-vae-cosine", 0, 0.88, 0.80),
        ("simclr-probabilistic-vae-cosine", 1, 0.90, 0.80),
        ("byol-weighted-vae-cosine", 0, 0.91, 0.81), ("byol-weighted-vae-cosine", 1, 0.95, 0.82),
    ])
    s = summarise(df).set_index("run")
    assert s["versus"].to_dict() == {
        "pixels": "", "byol-baseline": "", "byol-weighted-vae-cosine": "byol-baseline",
        "simclr-baseline": "byol-baseline",
        "simclr-probabilistic-vae-cosine": "simclr-baseline"}
    # 0.88 - 0.85, 0.90 - 0.86 against simclr's own baseline; 0.85 - 0.90, 0.86 - 0.92 for
    # simclr's baseline against byol's.
    assert s.loc["simclr-probabilistic-vae-cosine", "top1_diff"] == pytest.approx(0.035)
    assert s.loc["simclr-baseline", "top1_diff"] == pytest.approx(-0.055)
    assert s.loc["byol-weighted-vae-cosine", "top1_diff"] == pytest.approx(0.02)
    assert s.loc["simclr-probabilistic-vae-cosine", ["method", "variant", "latent"]].tolist() == [
        "simclr", "probabilistic", "vae"]


def test_combine_keeps_other_experiments(tmp_path, capsys):
    from pipeline.aggregate import combine

    res = tmp_path / "results"
    (res / "digits").mkdir(parents=True)
    (res / "synthetic").mkdir()
    (res / "digits" / "linear_eval.csv").write_text(
        "dataset,run,seed,top1,knn20_top1\ndigits,pixels,,0.9554,0.9694\n"
        "digits,byol-baseline,0,0.9889,0.9861\n")
    (res / "synthetic" / "linear_eval.csv").write_text(
        "dataset,run,seed,top1,knn5_top1\nsynthetic,pixels,,0.5000,0.4000\n")
    # A stale table elsewhere that names the current data set is not counted twice.
    (res / "old").mkdir()
    (res / "old" / "linear_eval.csv").write_text(
        "dataset,run,seed,top1\nsynthetic,pixels,,0.1\nold,pixels,,0.2\n")
    df = combine(res / "synthetic" / "linear_eval.csv", res / "linear_eval.csv")
    assert "combine: 4 rows" in capsys.readouterr().out
    text = (res / "linear_eval.csv").read_text().splitlines()
    assert text[0] == "dataset,run,seed,top1,knn5_top1,knn20_top1"
    assert text[1:] == ["digits,pixels,,0.9554,,0.9694", "digits,byol-baseline,0,0.9889,,0.9861",
                        "old,pixels,,0.2,,", "synthetic,pixels,,0.5000,0.4000,"]
    assert len(df) == 4
    # The first experiment again: the second one's rows stay.
    df = combine(res / "digits" / "linear_eval.csv", res / "linear_eval.csv")
    assert sorted(df["dataset"].unique()) == ["digits", "old", "synthetic"]


def test_aggregate_writes_summary_and_html(tmp_path, capsys):
    from pipeline.io import write_json

    paths = []
    for i, (run, seed, top1, knn) in enumerate([
            ("byol-baseline", 0, 0.9, 0.8), ("byol-baseline", 1, 0.92, 0.8),
            ("byol-weighted-vae-cosine", 0, 0.95, 0.85),
            ("byol-weighted-vae-cosine", 1, 0.971, 0.86)]):
        paths.append(tmp_path / f"{i}.json")
        write_json(paths[-1], {"dataset": "d", "run": run, **_columns(run), "seed": seed,
                               "top1": top1, "top5": None, "knn20_top1": knn,
                               "n_train": 10, "n_test": 5})
    aggregate(paths, tmp_path / "t.csv", summary=tmp_path / "s.csv",
              table_html=tmp_path / "t.html", summary_html=tmp_path / "s.html",
              overview=tmp_path / "o.rst")
    log = capsys.readouterr().out
    assert "aggregate: 4 rows, 2 configurations" in log
    assert "+0.0505 [+0.0441, +0.0569]" in log and "better than baseline" in log
    s = pd.read_csv(tmp_path / "s.csv")
    assert list(s["run"]) == ["byol-baseline", "byol-weighted-vae-cosine"]
    page = (tmp_path / "s.html").read_text()
    assert "<table" in page and "0.9605 ± 0.0148" in page and 'class="better"' in page
    assert "<td>byol-weighted-vae-cosine</td>" in (tmp_path / "t.html").read_text()
    assert "5 labelled test images" in (tmp_path / "o.rst").read_text()


def test_purity_joins_only_rows_with_that_space_and_metric(tmp_path):
    from pipeline.aggregate import add_purity, collect
    from pipeline.io import write_json

    rows = [("pixels", None), ("latent-vae", None), ("byol-baseline", 0), ("untrained", 0),
            ("byol-weighted-vae-cosine", 0), ("byol-weighted-ae-cosine", 0)]
    paths = []
    for run, seed in rows:
        p = tmp_path / f"{run}.json"
        write_json(p, {"dataset": "d", "run": run, **_columns(run), "seed": seed,
                       "top1": 0.5})
        paths.append(p)
    purity = pd.DataFrame({"space": ["vae", "vae"], "metric": ["cosine", "euclidean"],
                           "purity_at_1": [0.9, 0.8], "purity_at_k": [0.7, 0.6]})
    df = add_purity(collect(paths), purity).set_index("run")
    assert df.loc["byol-weighted-vae-cosine", "purity_at_1"] == 0.9
    assert df.loc["byol-weighted-vae-cosine", "purity_at_k"] == 0.7
    assert pd.isna(df.loc["byol-weighted-ae-cosine", "purity_at_1"])  # no such neighbours
    assert pd.isna(df.loc["latent-vae", "purity_at_1"])
    assert list(df.index) == ["pixels", "latent-vae", "untrained", "byol-baseline",
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
    from pipeline.features import latent_features
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


def test_grid_has_one_anchor_per_class():
    from pipeline.neighbours import grid_anchors

    labels = np.array([2, 2, 0, -1, 1, 0, 1, 2])
    np.testing.assert_array_equal(grid_anchors(labels), [2, 4, 0])  # first of class 0, 1, 2
    assert len(grid_anchors(np.arange(50) % 30, max_rows=20)) == 20
    np.testing.assert_array_equal(grid_anchors(np.full(5, -1)), [0, 1, 2, 3, 4])


def test_figures_say_why_when_there_is_nothing_to_compare(tmp_path):
    from pipeline.aggregate import summarise
    from pipeline.figures import accuracy_vs_purity, best_run, paired_chart

    s = summarise(_table([("pixels", None, 0.8, 0.7), ("byol-baseline", 0, 0.9, 0.8)]))
    assert best_run(s) is None
    paired_chart(s, tmp_path / "p.png")
    accuracy_vs_purity(s, tmp_path / "a.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "a.png").exists()


def test_knn_columns_say_the_k_that_voted_when_training_images_are_fewer(tmp_path, capsys):
    prepare(PrepareParams(name="synthetic"), tmp_path / "s.npz")
    row = evaluate(EvaluateParams(knn_k=[20, 200]), "pixels", tmp_path / "s.npz",
                   tmp_path / "s.npz", tmp_path / "pixels.json", dataset="synthetic")
    assert row["n_train"] == 128
    assert (row["knn20_k"], row["knn200_k"]) == (20, 128)
    out = capsys.readouterr().out
    assert ("WARNING: evaluate.knn_k 200 is more than the 128 labelled training images: "
            "knn200 columns vote with k = 128") in out
    assert "evaluate.knn_k 20 " not in out
    aggregate([tmp_path / "pixels.json"], tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").loc[0, "knn200_k"] == 128


def _digits_pixels(tmp_path):
    """The digits set as prepared (its own train/test split): pixel features and labels."""
    data = prepare(PrepareParams(), tmp_path / "digits")
    tr, te = data.split == "train", data.split == "test"
    x = pixel_features(data)
    return select(x, tr), data.labels[tr], select(x, te), data.labels[te]


def test_torch_probe_agrees_with_sklearn_on_digits(tmp_path):
    """Same objective, both L-BFGS to scipy's stopping rule: on digits' 1438 / 359 split
    (64 pixels, C = 1) they predict the same class for every test image (top-1 0.9554 each)
    and their probabilities differ by at most 0.0090, by 8.5e-5 on average (measured)."""
    x, y, xt, yt = _digits_pixels(tmp_path)
    ref = sklearn_probe(x, y, xt, 10)
    ours = torch_probe(x, y, xt, 10, chunk=100)  # the gradient summed over 14 chunks
    assert abs(topk_correct(ours, yt, 1).mean() - topk_correct(ref, yt, 1).mean()) <= 0.01
    assert np.abs(ours - ref).max() < 0.02 and np.abs(ours - ref).mean() < 1e-3
    np.testing.assert_allclose(ours.sum(axis=1), 1.0)
    # Deterministic; chunking changes only the order of the sums.
    np.testing.assert_array_equal(torch_probe(x, y, xt, 10, chunk=100), ours)
    np.testing.assert_allclose(torch_probe(x, y, xt, 10), ours, atol=1e-6)
    # Two classes: one logistic vector, as scikit-learn's binary model.
    keep = np.flatnonzero(np.isin(y, [3, 8]))
    ref2 = sklearn_probe(select(x, keep), y[keep], xt, 10)
    ours2 = torch_probe(select(x, keep), y[keep], xt, 10)
    assert (ours2[:, [3, 8]] > 0).all() and (np.delete(ours2, [3, 8], axis=1) == 0).all()
    assert np.abs(ours2 - ref2).max() < 0.02  # measured 0.0094


def test_standardiser_is_standard_scaler_in_chunks():
    from sklearn.preprocessing import StandardScaler

    from pipeline.evaluate import standardiser

    x = np.random.default_rng(0).normal(3.0, 2.0, (101, 5)).astype(np.float32)
    x[:, 2] = 7.0  # constant: scale 1, as StandardScaler
    mean, scale = standardiser(x, chunk=10)
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(scale, ref.scale_, rtol=1e-10)
    assert scale[2] == 1.0


def test_probe_method_by_size_and_name():
    from pipeline import PipelineError
    from pipeline.evaluate import probe_method

    assert probe_method("auto", 1000, 64, 64_000) == "sklearn"
    assert probe_method("auto", 1001, 64, 64_000) == "torch"
    assert probe_method("sklearn", 10**9, 3072, 0) == "sklearn"
    with pytest.raises(PipelineError, match=r"^unknown probe 'sgd'; use one of: sklearn, torch$"):
        linear_probe(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros((1, 2)), 2, method="sgd")


def test_chunked_pixel_knn_equals_the_in_memory_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (90, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, 90)
    x = PixelMatrix(images)
    train, test = np.arange(70), np.arange(70, 90)
    dense_tr, dense_te = gather(x, train), gather(x, test)
    # Lazy pixels in chunks of 3 test and 8 training rows against one block of everything.
    ours = knn_scores(select(x, train), labels[train], select(x, test), 6, [1, 5, 20, 200],
                      0.07, chunk=3, train_chunk=8)
    for k in (1, 5, 20, 200):
        whole = weighted_knn_scores(dense_tr, labels[train], dense_te, 6, k, 0.07,
                                    chunk=len(test), train_chunk=len(train))
        np.testing.assert_allclose(ours[k], whole, rtol=1e-5)
        np.testing.assert_allclose(ours[k], brute_force_knn(dense_tr, labels[train], dense_te,
                                                            6, k, 0.07), rtol=1e-4)


@pytest.mark.parametrize("probe", ["sklearn", "torch"])
def test_evaluate_reads_the_prepared_folder_a_chunk_at_a_time(tmp_path, monkeypatch, probe):
    import pipeline.evaluate as ev
    from pipeline import io
    from pipeline.io import load_prepared

    prepare(PrepareParams(), tmp_path / "d")
    params = EvaluateParams(probe=probe, knn_k=[5, 20])
    whole = evaluate(params, "pixels", tmp_path / "d", tmp_path / "d", tmp_path / "a.json",
                     dataset="digits")
    counted = []

    def counting_load(path):
        data = load_prepared(path)
        data.images = CountingImages(data.images)
        counted.append(data.images)
        return data

    monkeypatch.setattr(io, "CHUNK", 64)
    monkeypatch.setattr(ev, "load_prepared", counting_load)
    chunked = evaluate(params, "pixels", tmp_path / "d", tmp_path / "d", tmp_path / "b.json",
                       dataset="digits")
    reads = counted[0].reads
    assert max(reads) <= 64 and sum(reads) > 1797  # every image, 64 at most at a time
    assert chunked["probe"] == whole["probe"] == probe
    for key in ("top1", "top5", "knn5_top1", "knn5_top5", "knn20_top1", "knn20_top5",
                "per_class_top1", "pca_test"):
        assert chunked[key] == whole[key], key


def test_encoder_features_from_the_memory_map_equal_those_in_memory(tmp_path):
    """encode_images reads the read-only map a batch at a time (no torch warning), also just
    some rows; write_untrained's statistics are those of the training rows."""
    import warnings

    import torch

    from pipeline.io import TRAINING_SPLITS, load_prepared
    from pipeline.train.encoder import (
        channel_stats,
        encode_checkpoint,
        encode_images,
        write_untrained,
    )

    prepare(PrepareParams(name="synthetic"), tmp_path / "d")
    write_untrained("smallconv", 0, tmp_path / "d", tmp_path / "enc.pt")
    data = load_prepared(tmp_path / "d")
    assert isinstance(data.images, np.memmap)
    expected, _ = encode_images(tmp_path / "enc.pt", np.array(data.images), "cpu")
    rows = np.flatnonzero(data.split == "test")[::2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped, summary = encode_checkpoint(tmp_path / "enc.pt", data, "cpu", batch_size=7)
        some, _ = encode_checkpoint(tmp_path / "enc.pt", data, "cpu", batch_size=7, rows=rows)
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(some, expected[rows], rtol=1e-5, atol=1e-6)
    assert summary["stage"] == "untrained" and mapped.dtype == np.float32
    train = data.rows(*TRAINING_SPLITS)
    mean, std = channel_stats(data.images, chunk=5, rows=train)
    ref = np.array(data.images)[train].astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-8)
    ck = torch.load(tmp_path / "enc.pt", weights_only=True)
    np.testing.assert_allclose(ck["mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(ck["std"].numpy(), std, rtol=1e-6)


def test_one_evaluate_call_writes_each_seeds_row_as_separate_calls_do(tmp_path, encoder,
                                                                      capsys, monkeypatch):
    """evaluate_train probes a run's seeds in one process: each JSON equals its own call's,
    and the prepared set is read once."""
    import pipeline.evaluate
    import pipeline.io
    from pipeline.train.encoder import write_untrained

    enc0, data = encoder
    enc1 = tmp_path / "encoder1.pt"
    write_untrained("smallconv", 1, data, enc1)
    common = ["evaluate", "--params", '{"max_iter": 100}', "--run", "untrained",
              "--dataset", "syn", "--device", "cpu", "--data", str(data)]
    together = [tmp_path / "seed0.json", tmp_path / "seed1.json"]
    reads = []

    def counted(path, _load=pipeline.io.load_prepared):
        reads.append(path)
        return _load(path)

    with monkeypatch.context() as m:
        m.setattr(pipeline.io, "load_prepared", counted)
        m.setattr(pipeline.evaluate, "load_prepared", counted)
        assert main([*common, "--seed", "0", "1", "--source", str(enc0), str(enc1),
                     "--out", *map(str, together)]) == 0
    assert len(reads) == 1
    for seed, enc, path in zip((0, 1), (enc0, enc1), together, strict=True):
        alone = tmp_path / f"alone{seed}.json"
        assert main([*common, "--seed", str(seed), "--source", str(enc), "--out",
                     str(alone)]) == 0
        got, want = json.loads(path.read_text()), json.loads(alone.read_text())
        assert got["seed"] == seed
        for key in ("top1", "top5", "knn20_top1", "feature_dim", "per_class_top1"):
            assert got[key] == want[key], key

    # A missing --out is refused before any work, naming the counts.
    capsys.readouterr()
    assert main([*common, "--seed", "0", "1", "--source", str(enc0), str(enc1),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err == (
        "error: evaluate: 2 --source, 1 --out and 2 --seed values; give one --out (and one "
        "--seed, if any) per --source\n")
    assert not (tmp_path / "x.json").exists()


def test_provenance_records_torchs_build_without_importing_torch():
    """A pixel or latent evaluation records torch's version (with its build tag) yet never
    pays for importing torch."""
    import subprocess
    import sys

    import torch

    code = ("import sys, json; from pipeline.io import provenance; "
            "p = provenance(); print(json.dumps([p['torch'], 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [str(torch.__version__), False]
