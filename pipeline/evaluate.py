"""Linear evaluation: logistic regression (and kNN) on frozen features of one representation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.config import parse_run_name
from pipeline.io import Prepared, load_prepared, locate, provenance, read_latents, write_json


@dataclass
class EvaluateParams:
    C: float = 1.0
    max_iter: int = 1000
    knn_k: int = 20
    untrained: bool = True


def pixel_features(data: Prepared) -> np.ndarray:
    """Raw pixels, flattened and scaled to [0, 1]: (N, H*W*C) float32."""
    return data.images.reshape(len(data.images), -1).astype(np.float32) / 255.0


def latent_features(path: str | Path, data: Prepared) -> tuple[np.ndarray, dict]:
    """Latent vectors from ``latents.parquet``, aligned to ``data.ids``; plus file metadata."""
    ids, vectors, meta = read_latents(path)
    pos, found = locate(ids, data.ids)
    if len(ids) != len(data.ids) or not found.all():
        raise PipelineError(f"{path}: ids do not match the prepared data set")
    return vectors[pos], meta


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0,
) -> float:
    """Top-1 test accuracy of a standardised multinomial logistic regression.

    Args:
        train_x: (N, D) features of labelled training images.
        train_y: (N,) int labels.
        test_x: (M, D) features of test images.
        test_y: (M,) int labels.
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
    return float((clf.predict(test_x) == test_y).mean())


def knn_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int
) -> float:
    """Top-1 accuracy of a majority vote among the k cosine-nearest training features."""
    def unit(x):
        x = x - train_x.mean(0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(train_x), unit(test_x)
    k = min(k, len(a))
    correct = 0
    n_classes = int(train_y.max()) + 1
    for start in range(0, len(b), 2048):
        sims = b[start:start + 2048] @ a.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(top), n_classes))
        np.add.at(votes, (np.arange(len(top))[:, None], train_y[top]), 1)
        correct += int((votes.argmax(1) == test_y[start:start + 2048]).sum())
    return correct / len(b)


def features_for(source: str | Path, data: Prepared, device: str) -> tuple[np.ndarray, dict]:
    """Features of every prepared image from a source chosen by its file type.

    ``.npz`` is the prepared set itself (raw pixels), ``.parquet`` a latent export,
    ``.pt`` a BYOL encoder checkpoint.
    """
    source = Path(source)
    if source.suffix == ".npz":
        return pixel_features(data), {}
    if source.suffix == ".parquet":
        return latent_features(source, data)
    if source.suffix == ".pt":
        from pipeline.byol import encode_checkpoint

        return encode_checkpoint(source, data, device)
    raise PipelineError(f"cannot evaluate {source}: expected .npz, .parquet or .pt")


def evaluate(
    params: EvaluateParams, run: str, source: str | Path, data_path: str | Path, out: str | Path,
    dataset: str, seed: int | None = None, device: str = "auto",
) -> dict:
    """Probe one representation and write its metrics JSON (one row of the results table)."""
    start = time.time()
    data = load_prepared(data_path)
    columns = parse_run_name(run)
    feats, summary = features_for(source, data, device)
    if not np.isfinite(feats).all():
        raise PipelineError(f"{source}: features contain NaN or infinite values")
    tr = (data.split == "train") & (data.labels >= 0)
    te = (data.split == "test") & (data.labels >= 0)
    if not tr.any() or not te.any():
        raise PipelineError(f"{data_path}: need labelled train and test images to evaluate")
    x_tr, y_tr, x_te, y_te = feats[tr], data.labels[tr], feats[te], data.labels[te]
    row = {
        "dataset": dataset,
        "run": run,
        **columns,
        "seed": seed,
        "top1": linear_probe(x_tr, y_tr, x_te, y_te, params.C, params.max_iter, seed or 0),
        "knn_top1": knn_accuracy(x_tr, y_tr, x_te, y_te, params.knn_k),
        "feature_dim": int(feats.shape[1]),
        "n_train": int(tr.sum()),
        "n_test": int(te.sum()),
        "eval_seconds": round(time.time() - start, 2),
        **{k: v for k, v in summary.items() if k not in ("params",)},
        "eval_params": asdict(params),
        "provenance": provenance(),
    }
    write_json(out, row)
    return row
