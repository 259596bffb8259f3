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
        try:
            yield tmp
        except OSError as e:
            # A full disk or a quota, mid-write: one line naming the file, not the chained
            # tracebacks of every layer that was writing (numpy, zipfile, the open file).
            reason = e.strerror or str(e) or type(e).__name__
            raise PipelineError(f"cannot write {shown_path(path)}: {reason}") from None
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shown_path(path: str | os.PathLike) -> str:
    """A path as a message names it: relative to the working folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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
                # Sized to the longest name: a fixed width (once U64) cut names and merged them.
                classes=np.asarray(data.classes, dtype=str),
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


def write_latents(path: str | Path, data: Prepared, vectors: np.ndarray,
                  meta: dict[str, str]) -> None:
    """Write one row per image of ``data`` (id, split, label, latent) with string metadata;
    the schema every vector table of the pipeline shares (latent spaces, BYOL features).

    Args:
        data: the prepared images, in the order of ``vectors``.
        vectors: (N, d) float32.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not np.isfinite(vectors).all():
        raise PipelineError(f"{path}: vectors contain NaN or infinite values")
    dim = vectors.shape[1]
    table = pa.table({
        "id": pa.array(data.ids.astype(np.int64), pa.int64()),
        "split": pa.array(data.split.astype(str).tolist(), pa.string()),
        "label": pa.array(data.labels.astype(np.int64), pa.int64()),
        "latent": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).reshape(-1), pa.float32()), dim),
    }).replace_schema_metadata({k.encode(): str(v).encode() for k, v in meta.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_latents(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """ids (N,), latent vectors (N, d) float32 and metadata of a ``latents.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["id", "latent"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise PipelineError(f"{path}: cannot read latents ({e})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    ids = table.column("id").to_numpy().astype(np.int64)
    col = table.column("latent").combine_chunks()
    if len(col) == 0:
        raise PipelineError(f"{path}: no rows")
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != lengths[0]).any():
            raise PipelineError(f"{path}: latent vectors differ in length")
        dim = int(lengths[0])
    else:
        raise PipelineError(f"{path}: column 'latent' must be a list of floats, got {col.type}")
    if col.null_count:
        raise PipelineError(f"{path}: {col.null_count} rows have no latent vector")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim)
    return ids, x, meta


def load_neighbours(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """Read a ``neighbours.parquet``.

    Returns:
        ids: (N,) int64 anchor ids; neighbours: (N, k) int64 ids, nearest first;
        distances: (N, k) float32; meta: schema metadata as str -> str.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"neighbours not found: {path}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise PipelineError(f"{path}: cannot read neighbours ({e})") from None
    missing = {"id", "neighbours", "distances"} - set(table.column_names)
    if missing:
        raise PipelineError(f"{path}: missing columns {sorted(missing)}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    n = table.num_rows

    def matrix(name, dtype):
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(n, -1)

    return (table.column("id").to_numpy().astype(np.int64), matrix("neighbours", np.int64),
            matrix("distances", np.float32), meta)


def locate(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``wanted`` ids in ``ids`` (any order), and which of them were found.

    Returns:
        pos: (M,) int64 indices into ``ids`` (meaningless where not found); found: (M,) bool.
    """
    if len(ids) == 0:
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    sorter = np.argsort(ids)
    pos = sorter[np.minimum(np.searchsorted(ids, wanted, sorter=sorter), len(ids) - 1)]
    return pos, ids[pos] == wanted


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically (see :func:`atomic_path`)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
