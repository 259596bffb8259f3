"""File formats and atomic writes: prepared data, JSON metrics, Parquet tables, checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import PipelineError, __version__

SPLITS = ("train", "test", "unlabeled")
# Images a self-supervised stage may train on (and mine neighbours among): labels unused.
TRAINING_SPLITS = ("train", "unlabeled")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A killed or failing writer therefore never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


@dataclass
class Prepared:
    """The canonical prepared data set.

    Attributes:
        images: uint8 array (N, H, W, C).
        labels: int64 array (N,), -1 where unknown.
        split: str array (N,) with values in ``SPLITS``.
        ids: int64 array (N,), unique and stable across runs.
        classes: class names, indexed by label.
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    classes: list[str]

    def subset(self, *splits: str) -> Prepared:
        mask = np.isin(self.split, splits)
        return Prepared(
            self.images[mask], self.labels[mask], self.split[mask], self.ids[mask], self.classes
        )

    def check(self) -> None:
        """Raise PipelineError if arrays disagree in shape, type or content."""
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise PipelineError(
                f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}"
            )
        for name in ("labels", "split", "ids"):
            if len(getattr(self, name)) != n:
                raise PipelineError(f"{name} has {len(getattr(self, name))} rows, images have {n}")
        if len(np.unique(self.ids)) != n:
            raise PipelineError("ids are not unique")
        bad = set(np.unique(self.split)) - set(SPLITS)
        if bad:
            raise PipelineError(f"unknown split values {sorted(bad)}; allowed: {SPLITS}")
        if n and (self.labels.min() < -1 or self.labels.max() >= max(len(self.classes), 1)):
            raise PipelineError(
                f"labels out of range [-1, {len(self.classes) - 1}]: "
                f"min {self.labels.min()}, max {self.labels.max()}"
            )


def save_prepared(path: str | os.PathLike, data: Prepared) -> None:
    data.check()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                images=data.images,
                labels=data.labels.astype(np.int64),
                split=data.split.astype("U9"),
                ids=data.ids.astype(np.int64),
                classes=np.asarray(data.classes, dtype="U64"),
            )


def load_prepared(path: str | os.PathLike) -> Prepared:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"prepared data set not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        return Prepared(
            images=z["images"],
            labels=z["labels"],
            split=z["split"].astype(str),
            ids=z["ids"],
            classes=[str(c) for c in z["classes"]],
        )


def code_version() -> str:
    """Package version plus the git commit of the source tree, when there is one."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return f"{__version__}+{sha}"


def provenance() -> dict:
    """What produced an artifact: code, library versions, host."""
    import torch

    return {
        "code_version": code_version(),
        "torch": str(torch.__version__),  # TorchVersion is refused by weights_only loads
        "python": platform.python_version(),
        "host": platform.node(),
    }
