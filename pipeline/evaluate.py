"""Evaluation of frozen features: logistic-regression probe and weighted kNN (top-1, top-5).

Bounded memory: raw pixels are read from the memory-mapped prepared set a chunk at a time
(``pipeline.features.PixelMatrix``), the kNN keeps a running top-k over chunks of test and
training rows, and above ``evaluate.torch_probe_above`` the probe is the torch one, which
streams its training features through every L-BFGS step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.features import Features, blocks, gather, latent_features, pixel_features, select
from pipeline.io import Prepared, is_prepared, load_prepared, provenance, write_json
from pipeline.knn import knn_scores, topk_correct, unit_rows


@dataclass
class EvaluateParams:
    C: float = 1.0
    max_iter: int = 1000
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    untrained: bool = True
    probe: str = "auto"
    torch_probe_above: int = 50_000_000


def _classes(train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes present in training, sorted, and each label's position among them."""
    classes, y = np.unique(train_y, return_inverse=True)
    if len(classes) < 2:
        raise PipelineError(f"the linear probe needs labelled training images of at least 2 "
                            f"classes, got {len(classes)}")
    return classes, y


def sklearn_probe(
    train_x: Features, train_y: np.ndarray, test_x: Features, n_classes: int,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0, device: str = "cpu",
) -> np.ndarray:
    """scikit-learn's StandardScaler + LogisticRegression (L-BFGS), features in memory.

    Pixel features are read whole here (as float32): auto picks this probe only below
    ``evaluate.torch_probe_above``. ``device`` is unused (scikit-learn runs on the CPU).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _classes(train_y)
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(gather(train_x), train_y)
    scores = np.zeros((len(test_x), n_classes))
    for start, block in blocks(test_x):
        scores[start:start + len(block), clf.classes_] = clf.predict_proba(block)
    return scores


def standardiser(x: Features, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of scikit-learn's StandardScaler fitted on ``x``, in two chunked passes.

    Float64 sums of the values, then of their squared deviations; scale 1 for the features
    StandardScaler counts as constant (its ``_is_constant_feature`` rule), so that
    ``(x - mean) / scale`` is its transform.

    Returns:
        mean, scale: (D,) float64.
    """
    n, d = x.shape
    total, sq = np.zeros(d), np.zeros(d)
    for _, block in blocks(x, chunk):
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / n
    for _, block in blocks(x, chunk):
        sq += ((block - mean) ** 2).sum(axis=0)
    var = sq / n
    eps = np.finfo(np.float64).eps
    scale = np.sqrt(var)
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale[constant | (scale < 10 * eps)] = 1.0
    return mean, scale


# Training features up to this many bytes (as float64) stay converted on a CPU between
# L-BFGS steps; above it each step reads them again, a chunk at a time.
PROBE_CACHE_BYTES = 256 << 20


def torch_probe(
    train_x: Features, train_y: np.ndarray, test_x: Features, n_classes: int,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0, device: str = "cpu",
    chunk: int | None = None,
) -> np.ndarray:
    """Multinomial logistic regression on standardised features, in torch, streamed in chunks.

    The objective and solver of :func:`sklearn_probe`: the mean cross-entropy plus
    ``||W||^2 / (2 C N)`` (scikit-learn's sum of cross-entropies + ``||W||^2 / (2 C)``, divided
    by N; no penalty on the intercept; a single logistic vector for two classes), minimised
    by full-batch L-BFGS from zero (history 10, strong Wolfe line search, stopping when no
    gradient entry exceeds 1e-4, as scipy's ``gtol``) in float64. The standardisation
    (:func:`standardiser`) is folded into the weights, so a chunk of raw features enters the
    product as it is read: the gradient of one step is accumulated over chunks of
    ``chunk`` rows (``pipeline.io.CHUNK``), and pixel features never exist as one float
    array. No randomness: ``seed`` is accepted for the probes' common signature.

    Args:
        train_x: (N, D) training features (an array, or pixels read where indexed).
        train_y: (N,) int labels in [0, n_classes).
        test_x: (M, D) test features.
        device: where to run (``auto``, ``cpu``, ``cuda[:N]``, or a torch.device).

    Returns:
        (M, n_classes) float64 probabilities; classes absent from training get 0.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.device import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    classes, y = _classes(train_y)
    binary = len(classes) == 2
    n, d = train_x.shape
    mean, scale = standardiser(train_x, chunk)
    f64 = {"dtype": torch.float64, "device": dev}
    inv, shift = torch.tensor(1.0 / scale, **f64), torch.tensor(mean / scale, **f64)
    w = torch.zeros(d, 1 if binary else len(classes), **f64, requires_grad=True)
    b = torch.zeros(w.shape[1], **f64, requires_grad=True)
    y_all = torch.from_numpy(y).to(dev)

    def logits(x: torch.Tensor) -> torch.Tensor:
        # ((x - mean) / scale) @ w + b, without a standardised copy of x
        return x @ (w * inv[:, None]) + (b - shift @ w)

    def to_device(block: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(block, requirements="W")).to(**f64)

    budget = (torch.cuda.mem_get_info(dev)[0] // 4 if dev.type == "cuda"
              else PROBE_CACHE_BYTES)
    cache = [(s, to_device(x)) for s, x in blocks(train_x, chunk)] if n * d * 8 <= budget \
        else None

    def closure() -> float:
        opt.zero_grad()
        total = 0.0
        for start, x in cache or ((s, to_device(x)) for s, x in blocks(train_x, chunk)):
            z, yb = logits(x), y_all[start:start + len(x)]
            loss = (F.binary_cross_entropy_with_logits(z[:, 0], yb.double(), reduction="sum")
                    if binary else F.cross_entropy(z, yb, reduction="sum")) / n
            loss.backward()
            total += loss.item()
        penalty = (w * w).sum() / (2 * C * n)
        penalty.backward()
        return total + penalty.item()

    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-4,
                            tolerance_change=64 * np.finfo(np.float64).eps, history_size=10,
                            line_search_fn="strong_wolfe")
    opt.step(closure)
    scores = np.zeros((len(test_x), n_classes))
    with torch.no_grad():
        for start, x in blocks(test_x, chunk):
            z = logits(to_device(x))
            p = (torch.cat([1 - torch.sigmoid(z), torch.sigmoid(z)], 1) if binary
                 else torch.softmax(z, 1))
            scores[start:start + len(x), classes] = p.cpu().numpy()
    return scores


PROBES = {"sklearn": sklearn_probe, "torch": torch_probe}


def probe_method(probe: str, n: int, d: int, torch_above: int) -> str:
    """The probe that runs: ``probe`` itself, or for ``auto`` scikit-learn's unless the
    training features hold more than ``torch_above`` values (N x D)."""
    if probe == "auto":
        return "torch" if n * d > torch_above else "sklearn"
    return probe


def linear_probe(
    train_x: Features, train_y: np.ndarray, test_x: Features, n_classes: int,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0, method: str = "sklearn",
    device: str = "cpu",
) -> np.ndarray:
    """Class probabilities of a standardised multinomial logistic regression.

    Args:
        train_x: (N, D) features of labelled training images.
        train_y: (N,) int labels in [0, n_classes).
        test_x: (M, D) features of test images.
        n_classes: width of the output; classes absent from training get probability 0.
        method: ``sklearn`` (:func:`sklearn_probe`) or ``torch`` (:func:`torch_probe`).

    Returns:
        (M, n_classes) float64 probabilities.
    """
    if method not in PROBES:
        raise PipelineError(f"unknown probe {method!r}; use one of: {', '.join(PROBES)}")
    return PROBES[method](train_x, train_y, test_x, n_classes, C, max_iter, seed, device)


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
    feats: Features, fit: np.ndarray, show: np.ndarray, max_points: int = 2000,
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
    pca.fit(unit_rows(gather(feats, fit_rows)))
    xy = np.pad(pca.transform(unit_rows(gather(feats, rows))), ((0, 0), (0, 2 - n_comp)))
    explained = np.pad(pca.explained_variance_ratio_, (0, 2 - n_comp))
    return {"rows": rows.tolist(), "xy": np.round(xy, 4).tolist(),
            "explained": [round(float(v), 4) for v in explained]}


def features_for(source: str | Path, data: Prepared, device: str) -> tuple[Features, dict]:
    """Features of every prepared image from a source chosen by its file type.

    The prepared folder itself means raw pixels (a :class:`~pipeline.features.PixelMatrix`,
    read where indexed), ``.parquet`` a latent export, ``.pt`` an encoder checkpoint of any
    method (or the untrained control); these two in memory, (N, D) float32.
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


def evaluate_sources(
    params: EvaluateParams, run: str, sources: list, data_path: str | Path, outs: list,
    dataset: str, seeds: list, device: str = "auto",
) -> None:
    """:func:`evaluate` each source (a run's seeds) into its own JSON, in one process: the
    imports and the prepared set are loaded once, not once per seed."""
    data = load_prepared(data_path)
    for source, out, seed in zip(sources, outs, seeds, strict=True):
        evaluate(params, run, source, data_path, out, dataset, seed, device, data)


def evaluate(
    params: EvaluateParams, run: str, source: str | Path, data_path: str | Path, out: str | Path,
    dataset: str, seed: int | None = None, device: str = "auto",
    prepared: Prepared | None = None,
) -> dict:
    """Probe one representation and write its metrics JSON (one row of the results table).

    ``prepared`` is ``data_path`` already loaded, where one process evaluates several seeds:
    it is then read once, not once per seed."""
    start = time.time()
    data = load_prepared(data_path) if prepared is None else prepared
    feats, summary = features_for(source, data, device)
    columns = run_columns(source, summary)
    if isinstance(feats, np.ndarray) and not np.isfinite(feats).all():  # pixels always are
        raise PipelineError(f"{source}: features contain NaN or infinite values")
    tr = (data.split == "train") & (data.labels >= 0)
    te = (data.split == "test") & (data.labels >= 0)
    if not tr.any() or not te.any():
        raise PipelineError(f"{data_path}: need labelled train and test images to evaluate")
    x_tr, y_tr, x_te, y_te = select(feats, tr), data.labels[tr], select(feats, te), data.labels[te]
    n_classes = max(len(data.classes), int(max(y_tr.max(), y_te.max())) + 1)
    method = probe_method(params.probe, *x_tr.shape, params.torch_probe_above)
    probe = linear_probe(x_tr, y_tr, x_te, n_classes, params.C, params.max_iter, seed or 0,
                         method, device)
    scores = {"": probe}
    knn = knn_scores(x_tr, y_tr, x_te, n_classes, params.knn_k, params.knn_temperature)
    used = {}
    for k in params.knn_k:
        scores[f"knn{k}_"] = knn[k]
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
        "probe": method,
        "n_train": int(tr.sum()),
        "n_test": int(te.sum()),
        "n_classes": n_classes,
        "eval_seconds": round(time.time() - start, 2),
    }
    # What the source records about itself, never over the evaluation's own columns (a
    # latent export's n_train counts the unlabeled images its model trained on too).
    row |= {k: v for k, v in summary.items() if k != "params" and k not in row}
    row |= {
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
