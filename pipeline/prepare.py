"""Prepare stage: turn a data-set source into the canonical prepared file (uint8 NHWC)."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import PipelineError
from pipeline.io import TRAINING_SPLITS, Prepared, save_prepared, write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class SyntheticParams:
    classes: int = 4
    per_class: int = 40
    size: int = 16
    channels: int = 1
    noise: float = 0.2


@dataclass
class PrepareParams:
    name: str = "digits"
    tag: str | None = None
    root: str | None = None
    download: bool = False
    resize: int | None = None
    test_fraction: float = 0.2
    max_train: int | None = None
    max_test: int | None = None
    stl10_unlabeled: bool = False
    seed: int = 0
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


def _assemble(parts: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> Prepared:
    """Concatenate per-split (images, labels); ids number images in split order."""
    images, labels, split = [], [], []
    for name, (x, y) in parts.items():
        if x.ndim == 3:
            x = x[..., None]
        images.append(np.ascontiguousarray(x, dtype=np.uint8))
        labels.append(np.asarray(y, dtype=np.int64))
        split.append(np.full(len(x), name))
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise PipelineError(f"splits have different image shapes: {sorted(shapes)}")
    images = np.concatenate(images)
    return Prepared(
        images=images,
        labels=np.concatenate(labels),
        split=np.concatenate(split).astype(str),
        ids=np.arange(len(images), dtype=np.int64),
        classes=classes,
    )


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask holding ``test_fraction`` of every class, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test[idx[: max(1, round(test_fraction * len(idx)))]] = True
    return test


DOWNLOADABLE = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10")


def _require_root(p: PrepareParams) -> Path:
    if not p.root:
        raise PipelineError(f"dataset.root is required for dataset.name={p.name!r}")
    root = Path(p.root)
    # Only torchvision's sets can be downloaded; a missing image folder or npz stays missing.
    downloadable = p.name in DOWNLOADABLE
    if not root.exists() and not (p.download and downloadable):
        hint = " or set dataset.download: true" if downloadable else ""
        raise PipelineError(
            f"dataset.root {str(root)!r} does not exist (dataset.name={p.name!r}); "
            f"point it at the files{hint}"
        )
    return root


def load_digits(p: PrepareParams) -> Prepared:
    """scikit-learn's bundled 8x8 digits (values 0-16, rescaled to 0-255), stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    test = _stratified_split(labels, p.test_fraction, p.seed)
    return Prepared(
        images=images,
        labels=labels,
        split=np.where(test, "test", "train").astype(str),
        ids=np.arange(len(images), dtype=np.int64),  # index in sklearn's array: stable
        classes=[str(c) for c in d.target_names],
    )


def load_synthetic(p: PrepareParams) -> Prepared:
    """Oriented sinusoidal gratings, one orientation (and hue) per class, plus noise."""
    s = p.synthetic
    rng = np.random.default_rng(p.seed)
    yy, xx = np.mgrid[0 : s.size, 0 : s.size] / s.size
    images, labels = [], []
    for c in range(s.classes):
        angle = np.pi * c / s.classes
        for _ in range(s.per_class):
            phase = rng.uniform(0, 2 * np.pi)
            freq = rng.uniform(2.0, 3.0)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            img = 0.5 + 0.4 * wave
            if s.channels == 3:
                tint = 0.6 + 0.4 * np.cos(2 * np.pi * (c / s.classes + np.arange(3) / 3))
                img = img[..., None] * tint
            else:
                img = img[..., None]
            img = img + rng.normal(0, s.noise, img.shape)
            images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
            labels.append(c)
    labels = np.asarray(labels, dtype=np.int64)
    test = _stratified_split(labels, p.test_fraction, p.seed)
    return Prepared(
        images=np.stack(images),
        labels=labels,
        split=np.where(test, "test", "train").astype(str),
        ids=np.arange(len(labels), dtype=np.int64),
        classes=[f"class{c}" for c in range(s.classes)],
    )


def _torchvision(p: PrepareParams, make: Callable[[str, str, bool], object], split: str,
                 missing: Callable[[Path], list[str]] | None = None):
    """Instantiate a torchvision data set, turning its errors into one actionable line.

    ``missing(root)`` lists the set's absent files, where the layout is known.
    """
    root = _require_root(p)
    try:
        return make(str(root), split, p.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        hint = "" if p.download else "; set dataset.download: true to fetch it"
        gone = missing(root) if missing else []
        # torchvision's own text repeats its download=True hint; the file names say more.
        detail = f"missing {', '.join(repr(f) for f in gone)}" if gone else str(e)
        raise PipelineError(
            # torchvision checks every file of CIFAR and STL10 whichever split it loads, so
            # name the split being loaded; MNIST-style sets name the files they lack.
            f"{p.name} files not found or corrupted under dataset.root {str(root)!r} (while "
            f"loading its {split} split){hint} ({detail})"
        ) from None
    except OSError as e:  # network failures during download
        raise PipelineError(f"{p.name}: download into {str(root)!r} failed: {e}") from None


def _tv_classes(ds, n: int) -> list[str]:
    return [str(c) for c in getattr(ds, "classes", None) or range(n)]


def _missing_raw_files(cls) -> Callable[[Path], list[str]] | None:
    """MNIST-style sets keep uncompressed files named after their ``resources`` in raw/."""
    if not hasattr(cls, "resources"):
        return None

    def missing(root: Path) -> list[str]:
        raw = root / cls.__name__ / "raw"
        names = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        return [str(raw / n) for n in names if not (raw / n).is_file()]

    return missing


def _load_tv_train_flag(cls_name: str) -> Callable[[PrepareParams], Prepared]:
    """MNIST, FashionMNIST, CIFAR10, CIFAR100: ``train=True/False`` sets with .data/.targets."""

    def load(p: PrepareParams) -> Prepared:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts, classes = {}, []
        for split in ("train", "test"):
            ds = _torchvision(p, lambda r, s, d: cls(r, train=(s == "train"), download=d), split,
                              _missing_raw_files(cls))
            data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
            targets = np.asarray(ds.targets, dtype=np.int64)
            parts[split] = (data, targets)
            classes = _tv_classes(ds, int(targets.max()) + 1)
        return _assemble(parts, classes)

    return load


def load_svhn(p: PrepareParams) -> Prepared:
    import torchvision.datasets as tvd

    parts = {}
    for split in ("train", "test"):
        ds = _torchvision(p, lambda r, s, d: tvd.SVHN(r, split=s, download=d), split)
        parts[split] = (ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels) % 10)
    return _assemble(parts, [str(c) for c in range(10)])


def load_stl10(p: PrepareParams) -> Prepared:
    import torchvision.datasets as tvd

    splits = ("train", "test", "unlabeled") if p.stl10_unlabeled else ("train", "test")
    parts, classes = {}, []
    for split in splits:
        ds = _torchvision(p, lambda r, s, d: tvd.STL10(r, split=s, download=d), split)
        labels = np.asarray(ds.labels, dtype=np.int64) if split != "unlabeled" else None
        if labels is None:
            labels = np.full(len(ds.data), -1, dtype=np.int64)
        parts[split] = (ds.data.transpose(0, 2, 3, 1), labels)
        classes = _tv_classes(ds, 10)
    return _assemble(parts, classes)


_SAVE_AS = "save it as 8-bit grey or RGB (or 16-bit grey)"


def _grey(img: Image.Image, name: str) -> Image.Image:
    return img.convert("L")


def _rgb(img: Image.Image, name: str) -> Image.Image:
    # Transparency is dropped with the alpha channel; removing it first spares Pillow's warning.
    img.info.pop("transparency", None)
    return img.convert("RGB")


def _grey16(img: Image.Image, name: str) -> Image.Image:
    # Image.convert("L") clips (40000 -> 255); // 257 maps 0..65535 onto 0..255 exactly.
    return Image.fromarray((np.asarray(img) // 257).astype(np.uint8))


def _grey32(img: Image.Image, name: str) -> Image.Image:
    a = np.asarray(img)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise PipelineError(f"unreadable image {name}: Pillow mode 'I' (32-bit integer) with "
                            f"values in [{lo}, {hi}], outside the 16-bit range [0, 65535]; "
                            f"{_SAVE_AS}")
    return Image.fromarray((a // 257).astype(np.uint8))  # 16-bit grey (PGM, old Pillow PNG)


# Pillow mode of an opened file -> how it becomes 8-bit grey (L) or RGB. Alpha is dropped,
# not composited over a background; palette images become RGB (even with a grey palette);
# colour profiles are not applied; 16-bit grey is scaled by // 257 (65535 -> 255); 32-bit
# integer grey only where every value fits 16 bits. Every other mode (F, LAB, HSV,
# premultiplied La/RGBa, ...) is refused, naming the file. A data set is grey only when every
# image is; otherwise grey images are repeated into RGB (load_imagefolder).
IMAGE_MODES: dict[str, Callable[[Image.Image, str], Image.Image]] = {
    "1": _grey, "L": _grey, "LA": _grey,
    "I;16": _grey16, "I;16L": _grey16, "I;16B": _grey16, "I;16N": _grey16,
    "I": _grey32,
    "P": _rgb, "PA": _rgb,
    "RGB": _rgb, "RGBA": _rgb, "RGBX": _rgb, "CMYK": _rgb, "YCbCr": _rgb,
}


def to_grey_or_rgb(img: Image.Image, name: str) -> Image.Image:
    """``img`` upright (its EXIF orientation applied, as a photo viewer shows it) as 8-bit
    grey (mode L) or RGB by the rule of ``IMAGE_MODES``; else PipelineError. Only the first
    frame of an animated or multi-page file is read."""
    convert = IMAGE_MODES.get(img.mode)
    if convert is None:
        raise PipelineError(f"unreadable image {name}: Pillow mode {img.mode!r} is not "
                            f"supported; {_SAVE_AS}")
    return convert(ImageOps.exif_transpose(img), name)


def _decode(name: str, raw: bytes, resize: int | None) -> np.ndarray:
    if not raw:
        raise PipelineError(f"unreadable image {name}: the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:
        # Pillow's own message names the in-memory buffer, not the file.
        raise PipelineError(f"unreadable image {name}: not a format Pillow can read "
                            f"({len(raw)} bytes)") from None
    except OSError as e:
        raise PipelineError(f"unreadable image {name}: {e}") from None
    img = to_grey_or_rgb(img, name)
    if resize:
        img = img.resize((resize, resize), Image.BILINEAR)
    return np.asarray(img)


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


def _to_uint8(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.size == 0:
        raise PipelineError(f"{path}: {key} holds no images (shape {x.shape})")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            kind = "NaN" if np.isnan(x).any() else "infinite"
            raise PipelineError(f"{path}: {key} contains {int(bad.sum())} {kind} values; "
                                "images must be uint8 or float in [0, 1]")
        if 0.0 <= x.min() and x.max() <= 1.0:
            return np.round(x * 255).astype(np.uint8)
        raise PipelineError(f"{path}: {key} must be uint8 or float in [0, 1], got {x.dtype} "
                            f"in [{x.min():g}, {x.max():g}]")
    raise PipelineError(f"{path}: {key} must be uint8 or float in [0, 1], got {x.dtype}")


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    """One array of an open .npz; damage and pickled object arrays become one line."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):  # numpy's text suggests unpickling, which we never do
            raise PipelineError(f"{path}: array {key!r} holds Python objects (dtype object); "
                                "store numbers or strings") from None
        raise PipelineError(f"{path}: array {key!r} is unreadable ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PipelineError(f"{path}: array {key!r} is damaged ({e})") from None


def load_npz(p: PrepareParams) -> Prepared:
    """A .npz with x_train, y_train, x_test, y_test (NHW or NHWC); optional class names."""
    path = _require_root(p)
    # np.load would read a non-zip file as .npy or pickle, and say so in numpy's words.
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"dataset.root {str(path)!r}: not a .npz file (no zip archive "
                            "found: wrong format, or truncated)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PipelineError(f"dataset.root {str(path)!r}: not a readable .npz file ({e})") from None
    with z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise PipelineError(f"{path}: missing arrays {missing} (has {sorted(z.files)})")
        parts = {}
        for split in ("train", "test"):
            x = _to_uint8(_npz_array(z, f"x_{split}", path), f"x_{split}", path)
            y = _npz_array(z, f"y_{split}", path)
            if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
                raise PipelineError(f"{path}: x_{split} must be NHW or NHWC with 1 or 3 channels,"
                                    f" got shape {x.shape}")
            if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
                raise PipelineError(f"{path}: y_{split} must be {len(x)} integers, got "
                                    f"{y.dtype} {y.shape}")
            parts[split] = (x, y.astype(np.int64))
        n_train_classes = int(parts["train"][1].max()) + 1
        classes = [str(c) for c in range(n_train_classes)]
        if "classes" in z.files:
            names = _npz_array(z, "classes", path)
            if names.ndim != 1 or names.dtype.kind not in "USiu":
                raise PipelineError(f"{path}: classes must be a 1-D array of names, got "
                                    f"{names.dtype} {names.shape}")
            classes = [str(c) for c in names]
            if twins := _unicode_twins(classes):
                a, b = twins
                same = (f"class name {a!r} appears twice" if a == b else f"class names "
                        f"{ascii(a)} and {ascii(b)} are one name after Unicode normalisation")
                raise PipelineError(f"{path}: {same} in classes; class names must be unique")
    for split, (_, y) in parts.items():
        bad = y[(y < -1) | (y >= len(classes))]
        if len(bad):
            raise PipelineError(
                f"{path}: y_{split} label {int(bad[0])} out of range [-1, {len(classes) - 1}]"
            )
    return _assemble(parts, classes)


DATASETS: dict[str, Callable[[PrepareParams], Prepared]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "mnist": _load_tv_train_flag("MNIST"),
    "fashionmnist": _load_tv_train_flag("FashionMNIST"),
    "cifar10": _load_tv_train_flag("CIFAR10"),
    "cifar100": _load_tv_train_flag("CIFAR100"),
    "svhn": load_svhn,
    "stl10": load_stl10,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
}


def _subsample(data: Prepared, split: str, limit: int | None, seed: int) -> Prepared:
    mask = data.split == split
    if limit is None or mask.sum() <= limit:
        return data
    rng = np.random.default_rng(seed)
    drop = rng.permutation(np.flatnonzero(mask))[limit:]
    keep = np.ones(len(data.ids), dtype=bool)
    keep[drop] = False
    return Prepared(data.images[keep], data.labels[keep], data.split[keep], data.ids[keep],
                    data.classes)


def check_source(p: PrepareParams) -> None:
    """Cheap checks run before any job: a known name and an existing root."""
    if p.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise PipelineError(f"unknown dataset.name {p.name!r}; known: {known}")
    if p.name not in ("digits", "synthetic"):
        _require_root(p)


def prepare(params: PrepareParams, out: str | Path) -> Prepared:
    """Load ``params.name`` from its source, subsample if asked, check and write ``out``."""
    check_source(params)
    data = DATASETS[params.name](params)
    data = _subsample(data, "train", params.max_train, params.seed)
    data = _subsample(data, "test", params.max_test, params.seed + 1)
    data.check()
    save_prepared(out, data)
    print(summary_line(data), file=sys.stderr)
    return data


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
        data: prepared ``data.npz``; only its split and label arrays are read.
        out: JSON marker with the counts checked.
        k: ``neighbours.k`` when neighbours are mined, else None.
        queue_size: ``byol.online.queue_size`` when online neighbours are used, else None.
    """
    with np.load(data, allow_pickle=False) as z:  # lazy: the images stay on disk
        split, labels, ids = z["split"].astype(str), z["labels"], z["ids"]
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
        raise PipelineError(f"config key 'byol.online.queue_size': {queue_size} is larger than "
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
