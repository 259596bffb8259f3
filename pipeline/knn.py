"""Weighted kNN on features: class scores from the k most cosine-similar labelled rows, in
chunks, and top-k correctness. Shared by the evaluation (``pipeline.evaluate``) and the
training's per-epoch monitor (``pipeline.train.monitor``), which must not depend on the
evaluation's code."""

from __future__ import annotations

import numpy as np

from pipeline import io as _io  # CHUNK read at call time: tests shrink it
from pipeline.features import Features, blocks


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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32; an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(
    train_x: Features, train_y: np.ndarray, test_x: Features, n_classes: int, ks: list[int],
    temperature: float = 0.07, chunk: int | None = None, train_chunk: int | None = None,
) -> dict[int, np.ndarray]:
    """Weighted kNN class scores for each k in ``ks``, from one search for the largest.

    Each chunk of ``chunk`` test rows (1024, or ``pipeline.io.CHUNK`` if fewer) is compared
    with the training rows ``train_chunk`` (``pipeline.io.CHUNK``) at a time, keeping a
    running top-k: no (M, N) similarity matrix, at most (1024, CHUNK) similarities at once.
    Features in memory are L2-normalised once (a copy the size of the features); pixel
    features are read and normalised a chunk at a time, for every test chunk.

    Returns:
        ``{k: (M, n_classes) float64 scores}`` as :func:`weighted_knn_scores`.
    """
    n = len(train_x)
    kmax = min(max(ks), n)
    chunk, step = chunk or min(1024, _io.CHUNK), train_chunk or _io.CHUNK
    unit = unit_rows(train_x) if isinstance(train_x, np.ndarray) else None

    def train_blocks():
        if unit is not None:
            yield from ((s, unit[s:s + step]) for s in range(0, n, step))
        else:
            yield from ((s, unit_rows(x)) for s, x in blocks(train_x, step))

    out = {k: np.zeros((len(test_x), n_classes)) for k in ks}
    for start, q in blocks(test_x, chunk):
        q = unit_rows(q)
        best_s, best_i = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        for s, a in train_blocks():
            sims = q @ a.T
            if sims.shape[1] > kmax:
                top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
                sims, pos = np.take_along_axis(sims, top, 1), top + s
            else:
                pos = np.broadcast_to(np.arange(s, s + len(a)), sims.shape)
            best_s, best_i = np.concatenate([best_s, sims], 1), np.concatenate([best_i, pos], 1)
            if best_s.shape[1] > kmax:
                top = np.argpartition(-best_s, kmax - 1, axis=1)[:, :kmax]
                best_s = np.take_along_axis(best_s, top, 1)
                best_i = np.take_along_axis(best_i, top, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        weights = np.exp(np.take_along_axis(best_s, order, 1).astype(np.float64) / temperature)
        labels = train_y[np.take_along_axis(best_i, order, 1)]
        rows = np.broadcast_to(np.arange(len(q))[:, None], labels.shape)
        for k in ks:
            kk = min(k, n)
            np.add.at(out[k][start:start + len(q)], (rows[:, :kk], labels[:, :kk]),
                      weights[:, :kk])
    return out


def weighted_knn_scores(
    train_x: Features, train_y: np.ndarray, test_x: Features, n_classes: int, k: int,
    temperature: float = 0.07, chunk: int | None = None, train_chunk: int | None = None,
) -> np.ndarray:
    """Weighted kNN class scores, as solo-learn's WeightedKNNClassifier and lightly's knn_predict.

    Features are L2-normalised; each test image takes its k most cosine-similar training
    images (k capped at the number of training images), and each neighbour adds
    ``exp(similarity / temperature)`` to the score of its label. Computed in chunks of test
    and training rows (:func:`knn_scores`).

    Args:
        train_x: (N, D) training features; train_y: (N,) int labels in [0, n_classes).
        test_x: (M, D) test features.

    Returns:
        (M, n_classes) float64 scores.
    """
    return knn_scores(train_x, train_y, test_x, n_classes, [k], temperature, chunk,
                      train_chunk)[k]
