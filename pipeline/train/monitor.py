"""Per-epoch monitoring of a training run: weighted kNN top-1 on a held, labelled subset of the
training images, and the history's numbers as TensorBoard scalars."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.augment import to_float
from pipeline.io import RowView
from pipeline.knn import topk_correct, weighted_knn_scores


def held_rows(labels: np.ndarray, seed: int, queries: int, bank: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """A seeded, stratified pair of disjoint subsets of the labelled rows (labels >= 0).

    Each class's rows are shuffled and interleaved by their relative rank within the class
    (the i-th of n sits at (i + 0.5) / n), so any prefix of the order holds the classes in
    their proportions; the queries are the first rows of that order, the bank the next. When
    fewer than ``queries + bank`` rows are labelled, both shrink in proportion.

    Args:
        labels: (N,) int labels, -1 where unknown.
        seed: fixes the draw.
        queries, bank: the most rows of each.

    Returns:
        query rows, bank rows: int64 positions in ``labels``, each sorted (memory maps read
        them in file order).
    """
    rows = np.flatnonzero(np.asarray(labels) >= 0)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    _, cls, counts = np.unique(np.asarray(labels)[rows], return_inverse=True,
                               return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    rank = np.empty(len(rows))
    rank[by_class] = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = rows[np.lexsort((np.arange(len(rows)), (rank + 0.5) / counts[cls]))]
    n_query = queries
    if len(order) < queries + bank:
        n_query = min(queries, max(1, round(len(order) * queries / (queries + bank))))
    n_bank = min(bank, len(order) - n_query)
    return np.sort(order[:n_query]), np.sort(order[n_query:n_query + n_bank])


class KnnMonitor:
    """Weighted kNN top-1 of held training queries against a held training bank, per epoch.

    Built once per run; each call encodes the held images (eval mode, no gradients, in
    batches) and scores them with :func:`pipeline.knn.weighted_knn_scores` (cosine
    similarity, votes ``exp(sim / temperature)``), the evaluation protocol's kNN on a small,
    fixed sample: a cheap, label-using curve of what the representation has learnt. It
    draws no random numbers and changes no weight or buffer, so training is the same with
    it or without.

    Args:
        images: uint8 (N, H, W, C) training images (an array, memory map or RowView); the
            held rows are read from it at each call, a batch at a time.
        labels: (N,) int labels, -1 where unknown.
        seed: fixes which images are held.
        queries: the most query images; 0 disables the monitor.
        bank: the most bank (voting) images.
        k: neighbours that vote (capped at the bank's size).
        temperature: the votes' temperature.
        batch_size: images per forward pass.
    """

    def __init__(self, images: np.ndarray | RowView, labels: np.ndarray, seed: int,
                 queries: int = 1000, bank: int = 5000, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 512):
        labels = np.asarray(labels)
        self.images, self.k, self.temperature = images, k, temperature
        self.batch_size = batch_size
        classes = np.unique(labels[labels >= 0])
        self.enabled = queries > 0 and len(classes) >= 2
        q, b = (held_rows(labels, seed, queries, bank) if self.enabled
                else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        self.query_rows, self.bank_rows = q, b
        # Dense labels 0..C-1 for the vote table.
        self.query_y = np.searchsorted(classes, labels[q])
        self.bank_y = np.searchsorted(classes, labels[b])
        self.n_classes = len(classes)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, rows: np.ndarray, device: torch.device,
                  prepare: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        out = []
        for start in range(0, len(rows), self.batch_size):
            block = np.require(self.images[rows[start:start + self.batch_size]],
                               requirements=["C", "W"])
            x = prepare(to_float(torch.from_numpy(block).to(device)))
            out.append(encoder(x).float().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, encoder: nn.Module, device: torch.device | str,
                 prepare: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """Top-1 accuracy of the held queries, or None when disabled (fewer than 2 labelled
        classes, or no queries asked for).

        Args:
            encoder: maps prepared (B, C, H, W) float images to (B, D) features.
            device: where the encoder is.
            prepare: the training loop's float (B, C, H, W) in [0, 1] -> encoder input
                (standardisation with the prepared set's mean and std, memory layout).
        """
        if not self.enabled:
            return None
        modes = [(m, m.training) for m in encoder.modules()]
        encoder.eval()
        try:
            device = torch.device(device)
            bank = self._features(encoder, self.bank_rows, device, prepare)
            query = self._features(encoder, self.query_rows, device, prepare)
        finally:
            for m, training in modes:
                m.training = training
        if not (np.isfinite(bank).all() and np.isfinite(query).all()):
            return math.nan
        scores = weighted_knn_scores(bank, self.bank_y, query, self.n_classes, self.k,
                                     self.temperature)
        return float(topk_correct(scores, self.query_y, 1).mean())


class Scalars:
    """Per-epoch numbers as TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``);
    does nothing when ``folder`` is None.

    Args:
        folder: where the event files go (``<run>/tensorboard``), or None to disable.
        start: the first step this process writes; events of steps from ``start`` on that an
            earlier, interrupted process wrote are hidden (TensorBoard's purge), so a resumed
            run shows each epoch once.
    """

    def __init__(self, folder: str | Path | None, start: int = 1):
        self.writer = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency, but not of every install
                raise PipelineError(f"train.tensorboard needs the tensorboard package ({e}); "
                                    "pip install tensorboard, or set it false") from None
            self.writer = SummaryWriter(str(folder), purge_step=start)

    def write(self, row: dict, step: int | None = None) -> None:
        """Every number of ``row`` (a history row) as a scalar of its key at ``step`` (the
        row's ``epoch`` when None); strings, empty cells, booleans and None are skipped."""
        if self.writer is None:
            return
        step = int(row["epoch"]) if step is None else step
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a TensorBoard watching the folder sees each epoch as it ends

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Scalars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
