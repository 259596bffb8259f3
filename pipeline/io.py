"""File formats and atomic writes: prepared data, JSON metrics, Parquet tables, checkpoints."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
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
        os.chmod(tmp, 0o666 & ~_umask())
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
        images: uint8 array (N, H, W, C); a read-only memory map of ``images.npy`` when
            loaded from a prepared folder, so that only the rows a stage touches are read.
        labels: int64 array (N,), -1 where unknown.
        split: str array (N,) with values in ``SPLITS``.
        ids: int64 array (N,), unique and stable across runs.
        classes: class names, indexed by label.
        paths: str array (N,): each image's source file (inside the folder or archive it
            was read from), or "" where the source has no files (digits, torchvision sets).
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    classes: list[str]
    paths: np.ndarray | None = None

    def __post_init__(self):
        if self.paths is None:
            self.paths = np.full(len(self.ids), "", dtype=object)

    def subset(self, *splits: str) -> Prepared:
        """The rows of ``splits``, in memory (a copy of their images)."""
        mask = np.isin(self.split, splits)
        return Prepared(self.images[mask], self.labels[mask], self.split[mask], self.ids[mask],
                        self.classes, self.paths[mask])

    def view(self, *splits: str) -> Prepared:
        """The rows of ``splits`` without reading their images: ``images`` is a
        :class:`RowView`, read from disk only where indexed."""
        rows = self.rows(*splits)
        return Prepared(RowView(self.images, rows), self.labels[rows], self.split[rows],
                        self.ids[rows], self.classes, self.paths[rows])

    def rows(self, *splits: str) -> np.ndarray:
        """Row positions of ``splits``: index ``images`` with slices of them to read in chunks."""
        return np.flatnonzero(np.isin(self.split, splits))

    def check(self) -> None:
        """Raise PipelineError if arrays disagree in shape, type or content."""
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise PipelineError(
                f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}"
            )
        for name in ("labels", "split", "ids", "paths"):
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


class RowView:
    """Rows ``rows`` of an (N, ...) array (a memory map), read only where indexed: a lazy
    ``array[rows]``. Indexing with a slice or an integer array returns an in-memory copy."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *array.shape[1:])
        self.dtype, self.ndim = array.dtype, array.ndim
        self.nbytes = int(np.prod(self.shape)) * array.dtype.itemsize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        rows = self.rows[key]
        if np.ndim(rows) == 0:
            return np.array(self.array[int(rows)])
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (np.diff(rows) == 1).all():
            return np.array(self.array[rows[0]:rows[-1] + 1])  # one contiguous read
        return np.asarray(self.array[rows])


# The prepared set is a folder: images.npy (uint8 N x H x W x C, uncompressed, so every
# stage memory-maps it) and meta.parquet (one row per image: id, split, label, path; the
# class names and the format in its metadata).
PREPARED_FORMAT = "nnbyol-prepared/1"
IMAGES_FILE, META_FILE = "images.npy", "meta.parquet"
CHUNK = 4096  # rows a bounded-memory stage reads at a time


class PreparedWriter:
    """Write a prepared folder in bounded memory, atomically.

    :meth:`write` puts rows of the final (N, H, W, C) array into ``images.npy`` of a
    temporary folder beside ``path``, in any order, with plain file writes (a writable memory
    map would keep every written page resident); :meth:`finish` writes the metadata and
    renames the folder onto ``path``. Leaving the ``with`` block without :meth:`finish` (an
    error, a kill) removes the temporary folder: nothing half-written looks complete.
    """

    def __init__(self, path: str | os.PathLike, n: int, shape: tuple[int, int, int]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent))
        self.n, self.shape = int(n), tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape))
        try:
            self._fh = open(self.tmp / IMAGES_FILE, "wb")
            np.lib.format.write_array_header_2_0(self._fh, {
                "descr": "|u1", "fortran_order": False, "shape": (self.n, *self.shape)})
            self._offset = self._fh.tell()
            self._fh.truncate(self._offset + self.n * self.row_bytes)
        except OSError as e:
            self._cleanup()
            raise PipelineError(f"cannot write {shown_path(self.path)}: "
                                f"{e.strerror or e}") from None

    def __enter__(self) -> PreparedWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._cleanup()
        if isinstance(value, OSError):
            raise PipelineError(f"cannot write {shown_path(self.path)}: "
                                f"{value.strerror or value}") from None

    def _cleanup(self) -> None:
        import shutil

        if getattr(self, "_fh", None) is not None:
            self._fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write uint8 ``rows`` (M, H, W, C) at rows ``start`` to ``start + M``."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if rows.shape[1:] != self.shape or start < 0 or start + len(rows) > self.n:
            raise PipelineError(f"prepared rows {start}..{start + len(rows)} of shape "
                                f"{rows.shape[1:]} do not fit ({self.n}, *{self.shape})")
        self._fh.seek(self._offset + start * self.row_bytes)
        self._fh.write(rows.data)

    def finish(self, labels: np.ndarray, split: np.ndarray, ids: np.ndarray,
               classes: list[str], paths: np.ndarray | None = None) -> Prepared:
        """Check the set, write ``meta.parquet`` and move the folder onto ``path``."""
        import shutil

        import pyarrow as pa
        import pyarrow.parquet as pq

        self._fh.close()
        self._fh = None
        images = np.load(self.tmp / IMAGES_FILE, mmap_mode="r")
        data = Prepared(images, np.asarray(labels, np.int64), np.asarray(split).astype(str),
                        np.asarray(ids, np.int64), list(classes),
                        None if paths is None else np.asarray(paths, dtype=object))
        data.check()
        table = pa.table({
            "id": pa.array(data.ids, pa.int64()),
            "split": pa.array(data.split, pa.string()),
            "label": pa.array(data.labels, pa.int64()),
            "path": pa.array(data.paths.astype(str), pa.string()),
        }).replace_schema_metadata({
            b"format": PREPARED_FORMAT.encode(),
            b"classes": json.dumps(data.classes).encode(),
            b"shape": json.dumps([self.n, *self.shape]).encode(),
        })
        try:
            pq.write_table(table, self.tmp / META_FILE)
            os.chmod(self.tmp, 0o777 & ~_umask())
            old = None
            if self.path.is_dir():  # moved aside, then removed: the new set appears at once
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old",
                                            dir=self.path.parent))
                os.replace(self.path, old / "set")
            elif self.path.exists():
                raise PipelineError(f"cannot write {shown_path(self.path)}: a file is in the "
                                    "way of the prepared folder; move it")
            os.replace(self.tmp, self.path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise PipelineError(f"cannot write {shown_path(self.path)}: "
                                f"{e.strerror or e}") from None
        return load_prepared(self.path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_prepared(path: str | os.PathLike, data: Prepared) -> Prepared:
    """Write an in-memory :class:`Prepared` as a prepared folder (see :class:`PreparedWriter`)."""
    data.check()
    with PreparedWriter(path, len(data.images), data.images.shape[1:]) as w:
        for start in range(0, len(data.images), CHUNK):
            w.write(start, data.images[start:start + CHUNK])
        return w.finish(data.labels, data.split, data.ids, data.classes, data.paths)


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a prepared set (a stage reading it as a source reads pixels)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".npz"


def load_prepared(path: str | os.PathLike) -> Prepared:
    """The prepared set at ``path``: a prepared folder (images memory-mapped, read lazily) or
    the older single ``data.npz`` (read whole, as before)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return Prepared(images=z["images"], labels=z["labels"],
                            split=z["split"].astype(str), ids=z["ids"],
                            classes=[str(c) for c in z["classes"]])
    if not path.is_dir():
        raise PipelineError(f"prepared data set not found: {shown_path(path)}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path / META_FILE)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        images = np.load(path / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, pa.ArrowInvalid) as e:
        raise PipelineError(f"{shown_path(path)}: damaged prepared set ({e}); run prepare "
                            "again") from None
    if meta.get("format") != PREPARED_FORMAT:
        raise PipelineError(f"{shown_path(path)}: prepared format {meta.get('format')!r}, this "
                            f"code reads {PREPARED_FORMAT!r}; run prepare again")
    if images.shape[0] != table.num_rows or images.ndim != 4:
        raise PipelineError(f"{shown_path(path)}: {IMAGES_FILE} holds {images.shape} but "
                            f"{META_FILE} {table.num_rows} rows; run prepare again")
    return Prepared(
        images=images,
        labels=table.column("label").to_numpy().astype(np.int64),
        split=table.column("split").to_numpy().astype(str),
        ids=table.column("id").to_numpy().astype(np.int64),
        classes=json.loads(meta["classes"]),
        paths=table.column("path").to_numpy(),
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
        # The image's source file, so that a vector can be traced back to it ("" if none).
        "path": pa.array([str(p) for p in data.paths], pa.string()),
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


def torch_version() -> str:
    """``torch.__version__`` with its build tag (``2.14.1+cu130``), read from torch's
    ``version.py`` when torch is not imported yet: importing it (1-3 s) only to record its
    version would slow the stages that need none, such as the pixel and latent evaluations."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)  # TorchVersion: refused by weights_only
    spec = importlib.util.find_spec("torch")
    version_file = Path(spec.origin).with_name("version.py") if spec and spec.origin else None
    if version_file is None or not version_file.is_file():
        return importlib.metadata.version("torch")
    loader = importlib.util.spec_from_file_location("_torch_version", version_file)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return str(module.__version__)


def provenance() -> dict:
    """What produced an artifact: code, library versions, host."""
    return {
        "code_version": code_version(),
        "torch": torch_version(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
