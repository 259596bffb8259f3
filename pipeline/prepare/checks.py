"""Checks of a prepared data set before any training, and the prepare log's summary line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import TRAINING_SPLITS, Prepared, load_prepared, write_json


def summary_line(data: Prepared) -> str:
    """One line for the prepare log: images per split, classes and image shape."""
    counts = ", ".join(f"{s} {int((data.split == s).sum())}" for s in ("train", "test",
                                                                         "unlabeled")
                       if (data.split == s).any())
    h, w, c = data.images.shape[1:]
    return (f"prepared {len(data.ids)} images ({counts}), {len(data.classes)} classes, "
            f"{h}x{w}x{c} uint8")


def check_data(data: str | Path, out: str | Path, k: int | None,
               queue_size: int | None = None) -> dict:
    """Checks that need the prepared data, run before any training; write ``out`` if all pass.

    Args:
        data: the prepared folder; only its metadata is read.
        out: JSON marker with the counts checked.
        k: ``neighbours.k`` when neighbours are mined, else None.
        queue_size: ``train.queue.queue_size`` when the queue source is used, else None.
    """
    prepared = load_prepared(data)  # the images stay on disk (a memory map)
    split, labels, ids = prepared.split, prepared.labels, prepared.ids
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1]
        raise PipelineError(f"{data}: {len(twice)} ids appear more than once (first: "
                            f"{int(twice[0])}); every image needs its own id")
    n_train = int(np.isin(split, TRAINING_SPLITS).sum())
    if n_train < 2:
        raise PipelineError(f"{data}: {n_train} training images; at least 2 are needed")
    if k is not None and k >= n_train:
        raise PipelineError(f"neighbours.k = {k} must be less than the number of training "
                            f"images ({n_train}) in {data}")
    if queue_size is not None and queue_size > n_train:
        raise PipelineError(f"config key 'train.queue.queue_size': {queue_size} is larger than "
                            f"the {n_train} training images in {data}; lower it")
    labelled = {s: int(((split == s) & (labels >= 0)).sum()) for s in ("train", "test")}
    for s, count in labelled.items():
        if not count:
            raise PipelineError(f"{data}: no labelled {s} images; the linear evaluation needs "
                                "labels in both train and test")
    classes = np.unique(labels[(split == "train") & (labels >= 0)])
    if len(classes) < 2:
        raise PipelineError(f"{data}: the labelled training images are all of one class "
                            f"(label {int(classes[0])}); the evaluation needs at least 2 classes")
    counts = {"n_training": n_train, "n_labelled_train": labelled["train"],
              "n_labelled_test": labelled["test"], "k": k}
    write_json(out, counts)
    return counts
