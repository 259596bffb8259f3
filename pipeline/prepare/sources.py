"""Data-set sources by name: digits, synthetic gratings, torchvision's sets, image folders, npz.

Two registries, one name space (``DATASETS``): a source in ``LOADERS`` returns the whole set in
memory (digits, torchvision's sets and npz, which their own files hold in memory anyway) and
``prepare`` subsamples and writes it; a source in ``WRITERS`` (synthetic, imagefolder) writes
the prepared folder itself, a chunk at a time through a ``PreparedWriter``, choosing the
rows it keeps before making or decoding any image, so its memory does not grow with the
number of images.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import Prepared, PreparedWriter
from pipeline.prepare.folders import _unicode_twins, write_imagefolder
from pipeline.prepare.params import PrepareParams, _require_root
from pipeline.prepare.splits import chunk_rows, keep_rows, stratified_split


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


def load_digits(p: PrepareParams) -> Prepared:
    """scikit-learn's bundled 8x8 digits (values 0-16, rescaled to 0-255), stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    test = stratified_split(labels, p.test_fraction, p.seed)
    return Prepared(
        images=images,
        labels=labels,
        split=np.where(test, "test", "train").astype(str),
        ids=np.arange(len(images), dtype=np.int64),  # index in sklearn's array: stable
        classes=[str(c) for c in d.target_names],
    )


def write_synthetic(p: PrepareParams, out: str | os.PathLike) -> Prepared:
    """Oriented sinusoidal gratings, one orientation (and hue) per class, plus noise.

    Images are made one at a time in one random stream (phase, frequency, then noise, image
    after image, class after class) and written a chunk at a time; a row dropped by
    ``max_train``/``max_test`` still draws its numbers, so the images kept are the same.
    """
    s = p.synthetic
    labels = np.repeat(np.arange(s.classes, dtype=np.int64), s.per_class)
    split = np.where(stratified_split(labels, p.test_fraction, p.seed), "test", "train")
    keep = keep_rows(split, p)
    rng = np.random.default_rng(p.seed)
    yy, xx = np.mgrid[0 : s.size, 0 : s.size] / s.size
    shape = (s.size, s.size, s.channels)
    chunk = np.empty((chunk_rows(shape), *shape), dtype=np.uint8)
    with PreparedWriter(out, int(keep.sum()), shape) as w:
        i, row, n = 0, 0, 0  # image i of the stream; the chunk holds rows row to row + n
        for c in range(s.classes):
            angle = np.pi * c / s.classes
            direction = xx * np.cos(angle) + yy * np.sin(angle)
            tint = 0.6 + 0.4 * np.cos(2 * np.pi * (c / s.classes + np.arange(3) / 3))
            for _ in range(s.per_class):
                phase = rng.uniform(0, 2 * np.pi)
                freq = rng.uniform(2.0, 3.0)
                img = 0.5 + 0.4 * np.sin(2 * np.pi * freq * direction + phase)
                img = img[..., None] * tint if s.channels == 3 else img[..., None]
                img = img + rng.normal(0, s.noise, img.shape)
                if keep[i]:
                    chunk[n] = np.clip(img * 255, 0, 255).astype(np.uint8)
                    n += 1
                i += 1
                if n == len(chunk):
                    w.write(row, chunk)
                    row, n = row + n, 0
        w.write(row, chunk[:n])
        return w.finish(labels[keep], split[keep], np.flatnonzero(keep),
                        [f"class{c}" for c in range(s.classes)])


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


# Sources whose sets are loaded whole: prepare() subsamples and writes them.
LOADERS: dict[str, Callable[[PrepareParams], Prepared]] = {
    "digits": load_digits,
    "mnist": _load_tv_train_flag("MNIST"),
    "fashionmnist": _load_tv_train_flag("FashionMNIST"),
    "cifar10": _load_tv_train_flag("CIFAR10"),
    "cifar100": _load_tv_train_flag("CIFAR100"),
    "svhn": load_svhn,
    "stl10": load_stl10,
    "npz": load_npz,
}
# Sources that write the prepared folder ``out`` themselves, in bounded memory.
WRITERS: dict[str, Callable[[PrepareParams, str | os.PathLike], Prepared]] = {
    "synthetic": write_synthetic,
    "imagefolder": write_imagefolder,
}
DATASETS = (*LOADERS, *WRITERS)
