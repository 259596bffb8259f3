"""Evaluation of frozen features: logistic-regression probe and weighted kNN (top-1, top-5)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.features import latent_features, pixel_features
from pipeline.io import Prepared, is_prepared, load_prepared, provenance, write_json


@dataclass
class EvaluateParams:
    C: float = 1.0
    max_iter: int = 1000
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    untrained: bool = True


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its k highest-scoring classes.

    Args:
        scores: (M, K) class scores; column j is class j.
        labels: (M,) int true classes (a class >= K is never correct).
        k: how many top classes count.

    Returns:
        (M,) bool. Ties are broken towards the lower class index (a stable sort).
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0,
) -> np.ndarray:
    """Class probabilities of a standardised multinomial logistic regression.

    Args:
        train_x: (N, D) features of labelled training images.
        train_y: (N,) int labels in [0, n_classes).
        test_x: (M, D) features of test images.
        n_classes: width of the output; classes absent from training get probability 0.

    Returns:
        (M, n_classes) float64 probabilities.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    scores = np.zeros((len(test_x), n_classes))
    scores[:, clf.classes_] = clf.predict_proba(test_x)
    return scores


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_knn_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int,
    temperature: float = 0.07, chunk: int = 1024,
) -> np.ndarray:
    """Weighted kNN class scores, as solo-learn's WeightedKNNClassifier and lightly's knn_predict.

    Features are L2-normalised; each test image takes its k most cosine-similar training
    images (k capped at the number of training images), and each neighbour adds
    ``exp(similarity / temperature)`` to the score of its label.

    Args:
        train_x: (N, D) training features; train_y: (N,) int labels in [0, n_classes).
        test_x: (M, D) test features.

    Returns:
        (M, n_classes) float64 scores.
    """
    a, b = _unit(train_x), _unit(test_x)
    k = min(k, len(a))
    out = np.zeros((len(b), n_classes))
    for start in range(0, len(b), chunk):
        sims = b[start:start + chunk] @ a.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1).astype(np.float64) / temperature)
        rows = np.arange(len(top))[:, None]
        np.add.at(out[start:start + chunk], (np.broadcast_to(rows, top.shape), train_y[top]),
                  weights)
    return out


def accuracies(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float | None]:
    """Top-1 and, where there are more than 5 classes, top-5 accuracy of class scores."""
    top5 = float(topk_correct(scores, labels, 5).mean()) if n_classes > 5 else None
    return {"top1": float(topk_correct(scores, labels, 1).mean()), "top5": top5}


def per_class(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (None for a class without test images)."""
    hit = topk_correct(scores, labels, 1)
    return [float(hit[labels == c].mean()) if (labels == c).any() else None
            for c in range(n_classes)]


def pca_map(
    feats: np.ndarray, fit: np.ndarray, show: np.ndarray, max_points: int = 2000,
    max_fit: int = 5000,
) -> dict[str, list]:
    """2-D PCA of L2-normalised features: fit on rows ``fit``, coordinates of rows ``show``.

    Randomised PCA on at most ``max_fit`` fit rows and at most ``max_points`` shown rows,
    each evenly spaced, so that wide features (raw pixels of large images) stay cheap and
    the metrics JSON small. Returns ``{"rows": [...], "xy": [[x, y], ...], "explained":
    [r1, r2]}`` (rows index ``feats``; explained: each component's share of the variance).
    """
    from sklearn.decomposition import PCA

    def spaced(mask: np.ndarray, n: int) -> np.ndarray:
        rows = np.flatnonzero(mask)
        return rows[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))]

    fit_rows, rows = spaced(fit, max_fit), spaced(show, max_points)
    n_comp = min(2, feats.shape[1], len(fit_rows))
    pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=0)
    pca.fit(_unit(feats[fit_rows]))
    xy = np.pad(pca.transform(_unit(feats[rows])), ((0, 0), (0, 2 - n_comp)))
    explained = np.pad(pca.explained_variance_ratio_, (0, 2 - n_comp))
    return {"rows": rows.tolist(), "xy": np.round(xy, 4).tolist(),
            "explained": [round(float(v), 4) for v in explained]}


def features_for(source: str | Path, data: Prepared, device: str) -> tuple[np.ndarray, dict]:
    """Features of every prepared image from a source chosen by its file type.

    The prepared folder itself means raw pixels, ``.parquet`` a latent export,
    ``.pt`` an encoder checkpoint of any method (or the untrained control).
    """
    source = Path(source)
    if is_prepared(source):
        return pixel_features(data), {}
    if source.suffix == ".parquet":
        return latent_features(source, data)
    if source.suffix == ".pt":
        from pipeline.train.encoder import encode_checkpoint

        return encode_checkpoint(source, data, device)
    raise PipelineError(f"cannot evaluate {source}: expected the prepared folder, .parquet or .pt")


# The results table's identifying columns; a checkpoint carries its run's own.
RUN_COLUMNS = ("stage", "method", "variant", "source", "latent", "metric", "round")


def run_columns(source: str | Path, summary: dict) -> dict:
    """What the row is, from what was evaluated (never parsed back out of the run name):
    raw pixels, a latent space (its model from the file's metadata), or a trained encoder
    (the method, use, source and round its checkpoint records)."""
    if is_prepared(source):
        return {"stage": "pixels"}
    if Path(source).suffix == ".parquet":
        return {"stage": "latent", "latent": summary.get("model", "")}
    return {k: summary.pop(k) for k in RUN_COLUMNS if k in summary}


def evaluate(
    params: EvaluateParams, run: str, source: str | Path, data_path: str | Path, out: str | Path,
    dataset: str, seed: int | None = None, device: str = "auto",
) -> dict:
    """Probe one representation and write its metrics JSON (one row of the results table)."""
    start = time.time()
    data = load_prepared(data_path)
    feats, summary = features_for(source, data, device)
    columns = run_columns(source, summary)
    if not np.isfinite(feats).all():
        raise PipelineError(f"{source}: features contain NaN or infinite values")
    tr = (data.split == "train") & (data.labels >= 0)
    te = (data.split == "test") & (data.labels >= 0)
    if not tr.any() or not te.any():
        raise PipelineError(f"{data_path}: need labelled train and test images to evaluate")
    x_tr, y_tr, x_te, y_te = feats[tr], data.labels[tr], feats[te], data.labels[te]
    n_classes = max(len(data.classes), int(max(y_tr.max(), y_te.max())) + 1)
    probe = linear_probe(x_tr, y_tr, x_te, n_classes, params.C, params.max_iter, seed or 0)
    scores = {"": probe}
    used = {}
    for k in params.knn_k:
        scores[f"knn{k}_"] = weighted_knn_scores(x_tr, y_tr, x_te, n_classes, k,
                                                 params.knn_temperature)
        # The column keeps the configured k's name; knn<k>_k says how many voted.
        used[f"knn{k}_k"] = min(k, len(x_tr))
        if used[f"knn{k}_k"] < k:
            print(f"WARNING: evaluate.knn_k {k} is more than the {len(x_tr)} labelled training "
                  f"images: knn{k} columns vote with k = {len(x_tr)}", flush=True)
    metrics = {f"{prefix}{name}": value for prefix, s in scores.items()
               for name, value in accuracies(s, y_te, n_classes).items()}
    row = {
        "dataset": dataset,
        "run": run,
        **columns,
        "seed": seed,
        **metrics,
        **used,
        "feature_dim": int(feats.shape[1]),
        "n_train": int(tr.sum()),
        "n_test": int(te.sum()),
        "n_classes": n_classes,
        "eval_seconds": round(time.time() - start, 2),
        **{k: v for k, v in summary.items() if k not in ("params",)},
        "per_class_top1": per_class(probe, y_te, n_classes),
        "pca_test": pca_map(feats, tr, te),
        "eval_params": asdict(params),
        "provenance": provenance(),
    }
    write_json(out, row)
    knn = ", ".join(f"knn{k} top-1 {row[f'knn{k}_top1']:.4f}" for k in params.knn_k)
    top5 = f", top-5 {row['top5']:.4f}" if row["top5"] is not None else ""
    print(f"evaluate {run}" + (f" seed {seed}" if seed is not None else "")
          + f": linear top-1 {row['top1']:.4f}{top5}, {knn} ({row['n_train']} train / "
          f"{row['n_test']} test images, {row['feature_dim']}-d, {row['eval_seconds']} s)",
          flush=True)
    return row
