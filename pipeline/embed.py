"""Embed stage: a trained encoder's frozen features of images, for the prepared set (in the
latents.parquet schema) or for a folder or archive of image files (in bounded memory)."""

from __future__ import annotations

import json
import os
import posixpath
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import PipelineError
from pipeline.io import CHUNK, atomic_path, code_version, load_prepared, shown_path, write_latents
from pipeline.prepare import IMAGE_SUFFIXES, _decode, archive
from pipeline.prepare.folders import hidden, image_named, read_image_file, utf8
from pipeline.train.encoder import encode_images, load_encoder

EMBEDDINGS_FORMAT = "nnbyol-embeddings/1"
# Encoded bytes an archive chunk holds at most: 4096 camera JPEGs would be gigabytes.
_CHUNK_BYTES = 256 << 20


class Embeddings(NamedTuple):
    """Features of images, with the file each came from; unpacks as ``paths, features``.

    Attributes:
        paths: each image's path relative to the folder or its member name in the archive,
            in row order; None for images given as an array.
        features: (N, D) float32 encoder features (no projector, no augmentation).
    """

    paths: list[str] | None
    features: np.ndarray


@dataclass(frozen=True)
class ImageFiles:
    """The image files of a folder or a tar archive, listed by name only (nothing decoded).

    Attributes:
        root: the folder, or the ``.tar``/``.tar.gz`` (any tar compression) archive.
        names: paths relative to the folder (sorted), or member names in archive order (an
            archive is read front to back: seeking in a compressed tar restarts it), its
            links last: they are resolved once the archive has been read.
        archive: whether ``root`` is an archive.
        links: the archive's image links (hard or symbolic): name -> the member it leads to.
    """

    root: Path
    names: list[str]
    archive: bool
    links: dict[str, str] = field(default_factory=dict)

    @cached_property
    def _where(self) -> str:
        return shown_path(self.root)

    def shown(self, name: str) -> str:
        """How a message names one image: its file, or ``archive:member``."""
        return f"{self._where}{':' if self.archive else '/'}{name}"


def _is_image(name: str) -> bool:
    # Hidden files are skipped, as prepare does: macOS '._x.jpg' forks, .ipynb_checkpoints.
    return image_named(name) and not hidden(name)


def list_images(root: str | Path) -> ImageFiles:
    """The image files (by ``IMAGE_SUFFIXES``) under a folder, recursively, or in a tar archive.

    Hidden files and folders are skipped; linked folders are followed once. A broken link
    named like an image is listed, so that reading it fails naming it.
    """
    root = Path(root)
    if root.is_dir():
        names, seen = [], set()

        def fail(e: OSError):
            raise PipelineError(f"cannot list {shown_path(e.filename)}: {e.strerror or e}")

        for folder, dirs, filenames in os.walk(root, onerror=fail, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree, or a second link to one folder
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not hidden(d)]
            rel = Path(folder).relative_to(root)
            names += [(rel / f).as_posix() for f in filenames if _is_image((rel / f).as_posix())]
        files = ImageFiles(root, sorted(names), archive=False)
    elif root.is_file():
        files = _list_archive(root)
    else:
        raise PipelineError(f"{shown_path(root)}: no such folder or archive")
    if not files.names:
        raise PipelineError(f"{shown_path(root)}: no image files "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    for name in files.names:
        utf8(name, files.shown(name), "image path")
    return files


def _members(root: Path, wanted: Callable[[tarfile.TarInfo], bool] = lambda m: False,
             ) -> Iterator[tuple[tarfile.TarInfo, str, bytes | None]]:
    """:func:`pipeline.prepare.archive.members` of ``root``, its errors in this stage's words."""
    try:
        yield from archive.members(root, wanted, archive.StrictTarInfo)
    except archive.NotATar as e:
        raise PipelineError(f"{shown_path(root)} is neither a folder nor a readable tar "
                            f"archive (plain, gzip, bzip2 or xz): {e}") from None
    except archive.Damaged as e:
        raise PipelineError(f"{shown_path(root)}: damaged archive ({e})") from None


def _list_archive(root: Path) -> ImageFiles:
    names, targets, images = [], {}, []
    for m, name, _ in _members(root):
        if m.islnk() or m.issym():
            targets[name] = archive.link_target(m)
            if _is_image(name):
                images.append(name)
        elif m.isfile() and _is_image(name):
            names.append(name)
    return ImageFiles(root, names + images, archive=True,
                      links={name: archive.follow(name, targets) for name in images})


def _raw_chunks(files: ImageFiles, chunk: int) -> Iterator[list[tuple[str, bytes | Path]]]:
    """(name, encoded bytes, or the file to read them from) of every image, ``chunk`` at a time."""
    if not files.archive:
        for start in range(0, len(files.names), chunk):
            yield [(n, files.root / n) for n in files.names[start:start + chunk]]
        return
    # Files, then links, as listed; the bytes of link targets are kept until the end.
    targets, kept = set(files.links.values()), {}

    def wanted(m: tarfile.TarInfo) -> bool:
        name = posixpath.normpath(m.name)
        return _is_image(name) or name in targets

    def images() -> Iterator[tuple[str, bytes]]:
        i, regular = 0, len(files.names) - len(files.links)
        for _, name, raw in _members(files.root, wanted):
            if raw is None:
                continue
            if name in targets:
                kept[name] = raw
            if _is_image(name):
                if i >= regular or files.names[i] != name:
                    raise PipelineError(f"{shown_path(files.root)} changed while it was read")
                yield name, raw
                i += 1
        if i != regular:
            raise PipelineError(f"{shown_path(files.root)} changed while it was read")
        for name in files.names[regular:]:
            if files.links[name] not in kept:
                raise PipelineError(f"unreadable image {files.shown(name)}: link to "
                                    f"{files.links[name]!r}, not to a file in the archive")
            yield name, kept[files.links[name]]

    batch, size = [], 0
    for name, raw in images():
        batch.append((name, raw))
        size += len(raw)
        if len(batch) == chunk or size >= _CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _load(files: ImageFiles, name: str, raw: bytes | Path, size: int,
          channels: int) -> np.ndarray:
    """One image as uint8 (size, size, channels), by prepare's rules (``_decode``)."""
    from PIL import Image

    shown = files.shown(name)
    if isinstance(raw, Path):
        raw = read_image_file(raw, shown)
    a = _decode(shown, raw, size)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] != channels:  # grey into an RGB encoder repeats; RGB into a grey one: luma
        a = (np.repeat(a, 3, axis=2) if channels == 3
             else np.asarray(Image.fromarray(a).convert("L"))[..., None])
    return a


def read_images(files: ImageFiles, size: int, channels: int,
                chunk: int = CHUNK) -> Iterator[tuple[list[str], np.ndarray]]:
    """The images of ``files`` as (names, uint8 (M, size, size, channels)), ``chunk`` at a time.

    Each file becomes grey or RGB by prepare's rules (``IMAGE_MODES``: EXIF orientation
    applied, 16-bit grey scaled, alpha dropped), then is resized (bilinear) to size x size:
    the aspect ratio is not kept. Grey images are repeated into RGB for a 3-channel encoder.
    An archive chunk is cut short at 256 MiB of encoded files.
    """
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while it decodes
        for batch in _raw_chunks(files, chunk):
            rows = pool.map(lambda item: _load(files, *item, size, channels), batch)
            yield [name for name, _ in batch], np.stack(list(rows))


def _encoded(encoder: Path, files: ImageFiles, device: str, batch_size: int,
             chunk: int) -> Iterator[tuple[list[str], np.ndarray]]:
    _, ck = load_encoder(encoder, "cpu")
    for names, images in read_images(files, ck["image_size"], ck["in_channels"], chunk):
        yield names, encode_images(encoder, images, device, batch_size)[0]


def embed_images(encoder: str | Path, images: np.ndarray | str | Path,
                 device: str = "auto") -> Embeddings:
    """Features of your own images with any ``encoder.pt`` (any method's encoder, no projector).

    Args:
        encoder: an ``encoder.pt`` from ``results/<tag>/train/<run>/seed<N>/``.
        images: uint8 (N, H, W, C) or (N, H, W) at the encoder's size and channels, or a
            folder of image files (recursive, sorted by path) or a tar(.gz) of them (archive
            order), each converted by prepare's rules and resized to the encoder's square side
            (aspect ratio not kept; see :func:`read_images`).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.

    Returns:
        ``Embeddings(paths, features)``: features (N, D) float32, the ones the linear probe
        and kNN evaluate; paths of the files (None for an array). The files are read in
        chunks, but every feature is returned: for more images than memory holds, write them
        to Parquet with :func:`embed_files`.
    """
    encoder = Path(encoder)
    if isinstance(images, (str, Path)):
        files = list_images(images)
        feats = [f for _, f in _encoded(encoder, files, device, 1024, CHUNK)]
        return Embeddings(files.names, np.concatenate(feats))
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise PipelineError(f"images must be uint8 (N, H, W[, C]), got {images.dtype} "
                            f"{images.shape}")
    return Embeddings(None, encode_images(encoder, images, device)[0])


def embed_files(encoder: str | Path, images: str | Path, out: str | Path, device: str = "auto",
                batch_size: int = 256, chunk: int | None = None) -> None:
    """Write the features of a folder's (or tar archive's) images to Parquet, in bounded memory.

    Names are listed first; then ``chunk`` images at a time are decoded (:func:`read_images`),
    encoded and appended as one row group, with a progress line on stderr. The file appears
    only when complete (:func:`pipeline.io.atomic_path`).

    Args:
        encoder: an ``encoder.pt``.
        images: a folder of image files or a tar(.gz) archive of them.
        out: the Parquet file: ``path`` (string), ``feature`` (fixed-size list of float32),
            metadata: encoder, source, dimension, image_size, channels, backbone, images,
            code_version.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        batch_size: images per forward pass.
        chunk: images in memory at a time (default ``pipeline.io.CHUNK``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunk = CHUNK if chunk is None else chunk
    if batch_size < 1 or chunk < 1:
        raise PipelineError(f"batch size and chunk must be at least 1, got {batch_size} and "
                            f"{chunk}")
    start = time.time()
    encoder, out = Path(encoder), Path(out)
    model, ck = load_encoder(encoder, "cpu")  # a missing encoder fails before the listing
    files = list_images(images)
    n, dim = len(files.names), model.out_dim
    print(f"{n} images in {shown_path(files.root)}", file=sys.stderr, flush=True)
    meta = {"format": EMBEDDINGS_FORMAT, "encoder": _text(encoder), "source": _text(files.root),
            "dimension": str(dim), "image_size": str(ck["image_size"]),
            "channels": str(ck["in_channels"]), "backbone": ck["backbone"], "images": str(n),
            "code_version": code_version()}
    schema = pa.schema([("path", pa.string()), ("feature", pa.list_(pa.float32(), dim))],
                       metadata=meta)
    done = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for names, feats in _encoded(encoder, files, device, batch_size, chunk):
            if not np.isfinite(feats).all():
                raise PipelineError(f"{encoder}: features of {files.shown(names[0])} .. "
                                    f"{names[-1]} contain NaN or infinite values")
            values = pa.array(feats.reshape(-1), pa.float32())
            writer.write_table(pa.table(
                {"path": pa.array(names, pa.string()),
                 "feature": pa.FixedSizeListArray.from_arrays(values, dim)}, schema=schema))
            done += len(names)
            rate = done / max(time.time() - start, 1e-9)
            print(f"embedded {done}/{n} images ({rate:.0f} img/s)", file=sys.stderr, flush=True)
    seconds = time.time() - start
    print(f"embedded {n} images into {dim}-d features in {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.0f} img/s) -> {shown_path(out)}", file=sys.stderr)


def _text(path: Path) -> str:
    """A path as metadata text: bytes that are not UTF-8 escaped, never an encoding error."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_embeddings(path: str | Path) -> tuple[Embeddings, dict[str, str]]:
    """The ``Embeddings`` and metadata of a Parquet file written by :func:`embed_files`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", "feature"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise PipelineError(f"{path}: cannot read embeddings ({e})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    col = table.column("feature").combine_chunks()
    feats = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    return Embeddings(table.column("path").to_pylist(), feats), meta


def embed(encoder: Path, data: Path, out: Path, run: str, dataset: str, device: str) -> None:
    """Write ``features.parquet``: the encoder's features of every prepared image, one row per
    image (id, split, label, latent), with the metadata of ``latents.parquet`` (model = the
    training run), so that whatever reads a latent space reads these features too."""
    start = time.time()
    prepared = load_prepared(data)
    feats, summary = encode_images(encoder, prepared.images, device)
    meta = {
        "model": run,
        "dimension": str(feats.shape[1]),
        "dataset": dataset,
        "params": json.dumps(summary, sort_keys=True, default=str),
        "code_version": code_version(),
        "epochs": str(summary.get("epochs", "")),
        "encoder": str(encoder),
        "export_seconds": str(round(time.time() - start, 2)),
        "image_shape": "x".join(str(s) for s in prepared.images.shape[1:]),
    }
    write_latents(out, prepared, feats, meta)
    print(f"embedded {len(feats)} images into {feats.shape[1]}-d features ({run}) -> {out}",
          file=sys.stderr)
