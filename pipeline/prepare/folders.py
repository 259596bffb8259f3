"""The ``imagefolder`` source: a folder or a tar(.gz) of images, written in bounded memory.

The layout, in a folder or in a tar (there under any leading folders)::

    train/<class>/*   labelled training images (required)
    test/<class>/*    labelled test images (optional: without images in test/,
                      ``dataset.test_fraction`` of every class of train/ is held out as the
                      test split, stratified and seeded with ``dataset.seed``)
    unlabeled/*       images without a label, directly in the folder (optional: label -1,
                      split "unlabeled"; they train the self-supervised stages only)

Rows, and ids (the row index before ``max_train``/``max_test`` subsampling), run train/ by
(class, file name), then test/ by (class, file name), then unlabeled/ by file name; an
automatic split marks rows of train/ "test" in place. ``Prepared.paths`` holds each image's
path under the root (``train/cat/001.png``), in a tar its member name.

Memory stays bounded whatever the number of images: the files are listed by name; their
headers give each image's mode and upright size (grey only when every image is grey, and
the shape), before any pixel is decoded; the rows kept are chosen; then images are decoded
a chunk at a time (in a thread pool) into a :class:`~pipeline.io.PreparedWriter`. A tar is
read sequentially twice (headers, then pixels), never held whole. ``dataset.resize``
squashes every image to resize x resize (bilinear; the aspect ratio is not kept); without
it every image must have the size of the first.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from pipeline import PipelineError
from pipeline.io import Prepared, PreparedWriter
from pipeline.prepare import archive
from pipeline.prepare.images import _decode, header
from pipeline.prepare.params import PrepareParams, _require_root
from pipeline.prepare.splits import CHUNK_BYTES, chunk_rows, keep_rows, stratified_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_ORDER = {"train": 0, "test": 1, "unlabeled": 2}
_LAYOUT = ("expected <root>/train/<class>/*, optionally <root>/test/<class>/* and "
           "<root>/unlabeled/*")


class _Entry(NamedTuple):
    """One image of the layout."""

    split: str  # the folder it lies in: train, test or unlabeled
    cls: str  # its class folder; "" in unlabeled/
    path: str  # under the root, "/"-separated; in a tar, the member name
    member: int = -1  # in a tar: offset of the member holding its bytes (a link's target)
    head: tuple[int, int, int] | str | None = None  # in a tar: its header, or why it is bad


def write_imagefolder(p: PrepareParams, out: str | os.PathLike) -> Prepared:
    """Write the images of ``dataset.root`` (a folder or a tar) as the prepared folder ``out``.

    Returns:
        The written set, loaded (images memory-mapped).
    """
    root = _require_root(p)
    entries = _scan_tar(root) if root.is_file() else _list_folder(root)
    entries.sort(key=lambda e: (SPLIT_ORDER[e.split], e.cls, e.path))
    shown = (lambda e: e.path) if root.is_file() else (lambda e: str(root / e.path))
    classes, labels, split = _labels(entries, root, shown, p)
    keep = keep_rows(split, p)
    heads = (_tar_heads(entries) if root.is_file()
             else _map(lambda e: header(shown(e), read_image_file(root / e.path)), entries, 256))
    shape = _shape(entries, heads, shown, p.resize)
    kept = [e for e, k in zip(entries, keep, strict=True) if k]
    chunk = chunk_rows(shape)
    pixels = (_tar_pixels(root, kept, p.resize, chunk) if root.is_file()
              else _folder_pixels(root, kept, p.resize, chunk))
    with PreparedWriter(out, len(kept), shape) as w:
        _write(w, pixels, shape, shown(entries[0]), chunk)
        return w.finish(labels[keep], split[keep], np.flatnonzero(keep), classes,
                        np.asarray([e.path for e in kept], dtype=object))


def _labels(entries: list[_Entry], root: Path, shown: Callable[[_Entry], str],
            p: PrepareParams) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, labels and split of the sorted entries; the automatic split without test/."""
    folders: dict[str, str] = {}
    for e in entries:
        if e.split != "unlabeled":
            folders.setdefault(e.cls, str(Path(shown(e)).parent))
    # 'é' composed and decomposed are two folders on Linux but one name to a reader (and to
    # macOS): two classes that look the same would split one class's labels.
    if twins := _unicode_twins(folders):
        a, b = twins
        raise PipelineError(f"imagefolder: class folders {folders[a]!r} and {folders[b]!r} "
                            f"differ only in Unicode normalisation ({ascii(a)} vs {ascii(b)}); "
                            "rename one")
    classes = sorted({e.cls for e in entries if e.split == "train"})
    if not classes:
        raise PipelineError(f"imagefolder layout: no images in {str(root / 'train')!r}/<class>/")
    unknown = sorted({e.cls for e in entries if e.split == "test"} - set(classes))
    if unknown:
        raise PipelineError(f"imagefolder: test classes {unknown} have no training folder")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([-1 if e.split == "unlabeled" else index[e.cls] for e in entries],
                        dtype=np.int64)
    split = np.asarray([e.split for e in entries])
    if not (split == "test").any():
        labelled = np.flatnonzero(split == "train")
        split[labelled[stratified_split(labels[labelled], p.test_fraction, p.seed)]] = "test"
    return classes, labels, split


def _shape(entries: list[_Entry], heads: Iterable[tuple[int, int, int]],
           shown: Callable[[_Entry], str], resize: int | None) -> tuple[int, int, int]:
    """(H, W, C) of the set from every image's header: 3 channels if any image has colour."""
    first, channels = None, 1
    for e, (h, w, c) in zip(entries, heads, strict=True):
        channels = max(channels, c)
        if first is None:
            first = (h, w)
        elif not resize and (h, w) != first:
            raise _mixed(shown(e), (h, w), shown(entries[0]), first)
    return (resize, resize, channels) if resize else (*first, channels)


def _mixed(name: str, hw: tuple[int, int], first: str, first_hw: tuple[int, int]):
    return PipelineError(f"image {name} is {hw[1]}x{hw[0]} but {first} is {first_hw[1]}x"
                         f"{first_hw[0]}; set dataset.resize to use mixed sizes")


def _write(w: PreparedWriter, pixels: Iterable[tuple[Iterable[int], str, np.ndarray]],
           shape: tuple[int, int, int], first: str, chunk: int) -> None:
    """Write each decoded image to its rows, runs of consecutive rows in one write.

    ``pixels`` yields (rows, name, image) with image (H, W) or (H, W, C) as decoded.
    """
    run = np.empty((chunk, *shape), dtype=np.uint8)
    start, n = 0, 0  # run holds rows start to start + n
    for rows, name, a in pixels:
        if a.ndim == 2:
            a = a[..., None]
        if a.shape[:2] != shape[:2]:  # a header that promised another size
            raise _mixed(name, a.shape[:2], first, shape[:2])
        if a.shape[2] != shape[2] and a.shape[2] == 3:
            raise PipelineError(f"unreadable image {name}: decodes as colour but its header "
                                "says grey")
        for row in rows:
            if n and (row != start + n or n == chunk):
                w.write(start, run[:n])
                n = 0
            if not n:
                start = int(row)
            run[n] = a  # a grey image in a colour set broadcasts to its three channels
            n += 1
    w.write(start, run[:n])


def _map(fn: Callable, items: list, chunk: int) -> Iterator:
    """``fn`` over ``items`` in a thread pool, in order, a chunk at a time (futures for every
    item of a large set would themselves fill memory)."""
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start:start + chunk])


def utf8(name: str, shown: str, what: str = "imagefolder: the name") -> str:
    """``name``, if valid UTF-8: Python keeps other bytes of a file name as lone surrogates,
    which no text column (nor JSON) can store; else an error naming it as ``what shown``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{what} {ascii(shown)} is not valid UTF-8; rename it") from None
    return name


def image_named(name: str) -> bool:
    """Whether a file name (or a "/"-separated path) ends in one of ``IMAGE_SUFFIXES``."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def hidden(path: str) -> bool:
    """Whether a name, or any folder of a "/"-separated path, is hidden: skipped, like macOS
    '._x.jpg' forks, .DS_Store and .ipynb_checkpoints."""
    return any(part.startswith(".") for part in PurePosixPath(path).parts)


def read_image_file(f: Path, shown: str | None = None) -> bytes:
    """The bytes of an image file, or an error naming it (as ``shown``) and why: a broken
    link is named with its target."""
    try:
        return f.read_bytes()
    except OSError as e:
        what = (f"broken symbolic link to {os.readlink(f)!r}"
                if f.is_symlink() and not f.exists() else "cannot read it")
        raise PipelineError(f"unreadable image {shown or f}: {what} ({e.strerror or e})") from None


def _unicode_twins(names: Iterable[str]) -> tuple[str, str] | None:
    """The first two of ``names`` that are one name after Unicode NFC normalisation, if any."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def _refuse_empty_classes(empty: list[str]) -> None:
    # An error rather than a warning: a dropped class silently renumbers every label after it.
    if empty:
        raise PipelineError(f"imagefolder: class folder {empty[0]!r} holds no images"
                            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                            + "; add images or remove the folder")


# ------------------------------------------------------------------------------- a folder


def _list_folder(root: Path) -> list[_Entry]:
    """Every image under root/train/<class>/, root/test/<class>/ and root/unlabeled/, by name."""
    if not (root / "train").is_dir():
        loose = [f for f in root.iterdir() if image_named(f.name)]
        if loose:
            raise PipelineError(f"imagefolder layout: {str(root)!r} holds images ({loose[0].name}"
                                f", ...) but no train/ folder; {_LAYOUT}")
        raise PipelineError(f"imagefolder layout: missing folder {str(root / 'train')!r}; "
                            f"{_LAYOUT}")
    entries, empty = [], []
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            continue
        stray = [f.name for f in d.iterdir() if f.is_file() and not hidden(f.name)]
        if stray:
            raise PipelineError(
                f"imagefolder layout: file {str(d / stray[0])!r} lies outside a class folder"
            )
        for cls_dir in sorted(c for c in d.iterdir() if c.is_dir()):
            files = _images_in(cls_dir)
            if not files:
                empty.append(str(cls_dir))
            entries += [_Entry(split, utf8(cls_dir.name, str(cls_dir)),
                               utf8(f"{split}/{cls_dir.name}/{f.name}", str(f))) for f in files]
    d = root / "unlabeled"
    if d.is_dir():
        nested = [f for f in sorted(d.iterdir()) if f.is_dir() and not hidden(f.name)]
        if nested:
            raise PipelineError(f"imagefolder layout: {str(nested[0])!r} is a folder; "
                                "unlabeled/ holds images directly (label -1): put class "
                                "folders in train/<class>/")
        entries += [_Entry("unlabeled", "", utf8(f"unlabeled/{f.name}", str(f)))
                    for f in _images_in(d)]
    _refuse_empty_classes(empty)
    return entries


def _images_in(d: Path) -> list[Path]:
    # Every visible file is an image to be read; a dangling link named like an image is an
    # image lost: kept, so reading it fails.
    return [f for f in sorted(d.iterdir()) if not hidden(f.name) and (
        f.is_file() or f.is_symlink() and image_named(f.name))]


def _folder_pixels(root: Path, kept: list[_Entry], resize: int | None,
                   chunk: int) -> Iterator[tuple[Iterable[int], str, np.ndarray]]:
    def load(e: _Entry) -> tuple[str, np.ndarray]:
        name = str(root / e.path)
        return name, _decode(name, read_image_file(root / e.path), resize)

    for row, (name, a) in enumerate(_map(load, kept, chunk)):
        yield [row], name, a


# -------------------------------------------------------------------------------- a tar


def _tar_members(root: Path, wanted: Callable[[tarfile.TarInfo], bool],
                 ) -> Iterator[tuple[tarfile.TarInfo, str, bytes | None]]:
    """:func:`pipeline.prepare.archive.members` of the tar ``root``: any damage is an error
    naming the last member read (a partly read archive would silently lose images)."""
    try:
        yield from archive.members(root, wanted)
    except archive.NotATar as e:
        raise PipelineError(f"dataset.root {str(root)!r} is a file but not a readable tar "
                            f"archive (plain, gzip, bzip2 or xz): {e}") from None
    except archive.Damaged as e:
        where = f"after member {e.last!r}" if e.last else "before its first member"
        raise PipelineError(f"dataset.root {str(root)!r}: damaged archive, unreadable {where} "
                            f"({e})") from None


def _scan_tar(root: Path) -> list[_Entry]:
    """Every image of the layout in the tar ``root``, with its header, in archive order.

    Hard and symbolic links to files in the archive are followed (a symbolic link may point
    forward, so they resolve once every member is known).
    """
    entries, dirs, links, others = [], set(), {}, {}
    for m, name, raw in _tar_members(root, lambda m: _place(m, root) is not None):
        if m.isdir() and posixpath.basename(posixpath.dirname(name)) in ("train", "test"):
            dirs.add(utf8(name, f"{root}/{m.name}"))
        if m.islnk() or m.issym():
            links[name] = m
        place = _place(m, root)
        if place is None:
            if m.isfile():
                others[name] = m.offset
        elif m.isfile():
            entries.append(_Entry(*place, utf8(m.name, f"{root}/{m.name}"), m.offset,
                                  _tar_head(m.name, raw)))
        else:
            entries.append(_Entry(*place, utf8(m.name, f"{root}/{m.name}")))
    filled = {posixpath.dirname(posixpath.normpath(e.path)) for e in entries}
    _refuse_empty_classes(sorted(d for d in dirs if d not in filled))
    if links:
        entries = _follow_links(root, entries, links, others)
    return entries


def _place(m: tarfile.TarInfo, root: Path) -> tuple[str, str] | None:
    """(split, class) of an image member of the layout; None for any other member."""
    path = PurePosixPath(m.name)
    if (not (m.isfile() or m.islnk() or m.issym()) or not image_named(m.name)
            or hidden(m.name)):  # e.g. macOS's ._x.jpg resource forks, skipped as on disk
        return None
    parts = path.parts
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], utf8(parts[-2], f"{root}/{m.name}")
    if len(parts) >= 2 and parts[-2] == "unlabeled":
        return "unlabeled", ""
    if len(parts) >= 3 and parts[-3] == "unlabeled":
        raise PipelineError(f"imagefolder layout: {m.name!r} in {str(root)!r} lies in a folder "
                            "under unlabeled/; unlabeled/ holds images directly (label -1): "
                            "put class folders in train/<class>/")
    return None


def _tar_head(name: str, raw: bytes) -> tuple[int, int, int] | str:
    # Kept, not raised: the error reported is that of the first bad image in row order.
    try:
        return header(name, raw)
    except PipelineError as e:
        return str(e)


def _tar_heads(entries: list[_Entry]) -> Iterator[tuple[int, int, int]]:
    for e in entries:
        if isinstance(e.head, str):
            raise PipelineError(e.head)
        yield e.head


def _follow_links(root: Path, entries: list[_Entry], links: dict[str, tarfile.TarInfo],
                  others: dict[str, int]) -> list[_Entry]:
    """``entries`` with each link's member and header those of the file it leads to."""
    files = {**others, **{posixpath.normpath(e.path): e.member for e in entries
                          if e.member >= 0}}
    heads = {e.member: e.head for e in entries if e.member >= 0}
    targets = {name: archive.link_target(m) for name, m in links.items()}
    resolved = []
    for e in entries:
        if e.member < 0:
            name = archive.follow(posixpath.normpath(e.path), targets)
            if name not in files:  # out of the archive, to a folder, or a loop
                m = links[posixpath.normpath(e.path)]
                kind = "hard" if m.islnk() else "symbolic"
                raise PipelineError(f"unreadable image {m.name}: {kind} link to {m.linkname!r} "
                                    "does not lead to a file in the archive (archive with tar "
                                    "--dereference)")
            e = e._replace(member=files[name], head=heads.get(files[name]))
        resolved.append(e)
    missing = {e.member for e in resolved if e.head is None}
    if missing:  # links to files outside the layout: one more pass reads their headers
        raw = {m.offset: data for m, _, data in _tar_members(root, lambda m: m.offset in missing)
               if data is not None}
        resolved = [e if e.head is not None else e._replace(head=_tar_head(e.path, raw[e.member]))
                    for e in resolved]
    return resolved


def _tar_pixels(root: Path, kept: list[_Entry], resize: int | None,
                chunk: int) -> Iterator[tuple[Iterable[int], str, np.ndarray]]:
    """(rows, name, image) of every member the kept rows read, in archive order."""
    members = np.asarray([e.member for e in kept], dtype=np.int64)
    order = np.argsort(members, kind="stable")
    members = members[order]

    def rows_of(m: tarfile.TarInfo) -> np.ndarray:  # a file and the links leading to it
        return order[np.searchsorted(members, m.offset):np.searchsorted(members, m.offset,
                                                                         "right")]

    batch, size = [], 0
    with ThreadPoolExecutor() as pool:
        def decoded():
            arrays = pool.map(lambda b: _decode(b[1], b[2], resize), batch)
            return [(rows, name, a) for (rows, name, _), a in zip(batch, arrays, strict=True)]

        for m, _, raw in _tar_members(root, lambda m: len(rows_of(m)) > 0):
            if raw is None:
                continue
            rows = rows_of(m)
            batch.append((rows, kept[rows[0]].path, raw))
            size += len(raw)
            if len(batch) >= chunk or size >= CHUNK_BYTES:
                yield from decoded()
                batch, size = [], 0
        yield from decoded()
