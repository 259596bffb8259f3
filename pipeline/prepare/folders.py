"""The ``imagefolder`` source: <root>/{train,test}/<class>/* in a folder or a tar(.gz)."""

from __future__ import annotations

import os
import tarfile
import unicodedata
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import Prepared
from pipeline.prepare.images import _decode
from pipeline.prepare.params import PrepareParams, _require_root

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _imagefolder_entries(root: Path) -> list[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) of every image under root/{train,test}/<class>/, or in a tar.

    A tar is read in archive order: random access into a .tar.gz restarts decompression.
    """
    if root.is_file():
        return _tar_entries(root)
    entries, empty = [], []
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise PipelineError(
                f"imagefolder layout: missing folder {str(d)!r}; "
                "expected <root>/train/<class>/* and <root>/test/<class>/*"
            )
        stray = [f.name for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
        if stray:
            raise PipelineError(
                f"imagefolder layout: file {str(d / stray[0])!r} lies outside a class folder"
            )
        for cls_dir in sorted(c for c in d.iterdir() if c.is_dir()):
            # A dangling link named like an image is an image lost: kept, so reading it fails.
            files = [f for f in sorted(cls_dir.iterdir()) if not f.name.startswith(".") and (
                f.is_file() or f.is_symlink() and f.suffix.lower() in IMAGE_SUFFIXES)]
            if not files:
                empty.append(str(cls_dir))
            entries += [(split, cls_dir.name, str(f), _read(f)) for f in files]
    _refuse_empty_classes(empty)
    return entries


def _read(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        what = (f"broken symbolic link to {os.readlink(f)!r}"
                if f.is_symlink() and not f.exists() else "cannot read it")
        raise PipelineError(f"unreadable image {f}: {what} ({e.strerror or e})") from None


def _refuse_empty_classes(empty: list[str]) -> None:
    # An error rather than a warning: a dropped class silently renumbers every label after it.
    if empty:
        raise PipelineError(f"imagefolder: class folder {empty[0]!r} holds no images"
                            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                            + "; add images or remove the folder")


class _StrictTarInfo(tarfile.TarInfo):
    """A tar header reader that reports damage: tarfile ends the archive at a bad header.

    Only an all-zero block (the end-of-archive marker) ends the archive quietly; a header
    with a bad checksum, a partial block or a file that stops without the marker raises.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            if tar.offset == 0:  # not a tar at all (tarfile.open tries other compressions)
                raise
            reason = "the archive ends without its end marker" if isinstance(
                e, tarfile.EmptyHeaderError) else f"bad header at byte {tar.offset}: {e}"
            raise tarfile.ReadError(reason) from None


def _tar_entries(root: Path) -> list[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) of every image in a tar(.gz), read in archive order.

    Any damage (bad header, truncated or corrupt compression, gzip CRC) is an error naming
    the last member read: a partly read archive would silently lose images.
    """
    try:
        tar = tarfile.open(root, tarinfo=_StrictTarInfo)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        detail = str(e).splitlines()[0].rstrip(":")  # tarfile lists every method it tried
        raise PipelineError(f"dataset.root {str(root)!r} is a file but not a readable tar "
                            f"archive (plain, gzip, bzip2 or xz): {detail}") from None
    entries, dirs, links, last = [], set(), [], None
    try:
        with tar:
            for m in tar:
                parts = Path(m.name).parts
                if m.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    dirs.add(m.name.rstrip("/"))
                if (len(parts) >= 3 and parts[-3] in ("train", "test")
                        and Path(m.name).suffix.lower() in IMAGE_SUFFIXES):
                    if m.isfile():
                        entries.append((parts[-3], parts[-2], m.name, tar.extractfile(m).read()))
                    elif m.islnk() or m.issym():  # e.g. a second name of a hard-linked file
                        links.append((parts[-3], parts[-2], m))
                last = m.name
            # Read to the end: a gzip stream checks its CRC and length only there, and only
            # zero padding may follow the end marker (else a zeroed header ended it early).
            while chunk := tar.fileobj.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise tarfile.ReadError("data after the end-of-archive marker (a zeroed "
                                            "header?)")
            # Links resolve once every member is known: a symbolic link may point forward.
            entries += [(split, c, m.name, _tar_link(tar, m)) for split, c, m in links]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        where = f"after member {last!r}" if last else "before its first member"
        raise PipelineError(f"dataset.root {str(root)!r}: damaged archive, unreadable {where} "
                            f"({type(e).__name__}: {e})") from None
    filled = {str(Path(name).parent) for _, _, name, _ in entries}
    _refuse_empty_classes(sorted(d for d in dirs if d not in filled))
    return entries


def _tar_link(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    """The bytes a link member leads to; a link out of the archive or in a loop is an error."""
    try:
        f = tar.extractfile(m)
    except (KeyError, RecursionError):  # target not in the archive; a loop of links
        f = None
    if f is None:  # also a link to a directory
        kind = "hard" if m.islnk() else "symbolic"
        raise PipelineError(f"unreadable image {m.name}: {kind} link to {m.linkname!r} does not "
                            "lead to a file in the archive (archive with tar --dereference)")
    return f.read()


def _unicode_twins(names: Iterable[str]) -> tuple[str, str] | None:
    """The first two of ``names`` that are one name after Unicode NFC normalisation, if any."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def load_imagefolder(p: PrepareParams) -> Prepared:
    """``<root>/{train,test}/<class>/*``, images converted by ``IMAGE_MODES``; root may be a tar.

    A tar(.gz) holds the same layout; its hard and symbolic links to images in the archive
    are followed.
    """
    root = _require_root(p)
    entries = sorted(_imagefolder_entries(root), key=lambda e: (e[0] != "train", e[1], e[2]))
    folders: dict[str, str] = {}
    for _, c, name, _ in entries:
        folders.setdefault(c, str(Path(name).parent))
    # 'é' composed and decomposed are two folders on Linux but one name to a reader (and to
    # macOS): two classes that look the same would split one class's labels.
    if twins := _unicode_twins(folders):
        a, b = twins
        raise PipelineError(f"imagefolder: class folders {folders[a]!r} and {folders[b]!r} "
                            f"differ only in Unicode normalisation ({ascii(a)} vs {ascii(b)}); "
                            "rename one")
    train_classes = sorted({c for s, c, _, _ in entries if s == "train"})
    if not train_classes:
        raise PipelineError(f"imagefolder layout: no images in {str(root / 'train')!r}/<class>/")
    unknown = sorted({c for s, c, _, _ in entries if s == "test"} - set(train_classes))
    if unknown:
        raise PipelineError(f"imagefolder: test classes {unknown} have no training folder")
    if not any(s == "test" for s, _, _, _ in entries):
        raise PipelineError(f"imagefolder layout: no images in {str(root / 'test')!r}/<class>/")
    with ThreadPoolExecutor() as pool:
        arrays = list(pool.map(lambda e: _decode(e[2], e[3], p.resize), entries))
    # Grey only when every image is grey; otherwise promote grey images to RGB.
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    first = arrays[0].shape
    for (_, _, name, _), a in zip(entries, arrays, strict=True):
        if a.shape != first:
            raise PipelineError(
                f"image {name} is {a.shape[1]}x{a.shape[0]} but {entries[0][2]} is "
                f"{first[1]}x{first[0]}; set dataset.resize to use mixed sizes"
            )
    index = {c: i for i, c in enumerate(train_classes)}
    images = np.stack(arrays)
    if images.ndim == 3:
        images = images[..., None]
    return Prepared(
        images=images,
        labels=np.asarray([index[c] for _, c, _, _ in entries], dtype=np.int64),
        split=np.asarray([s for s, _, _, _ in entries]).astype(str),
        ids=np.arange(len(entries), dtype=np.int64),
        classes=train_classes,
    )
