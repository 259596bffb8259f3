"""The torchvision-backed prepare loaders (CIFAR-10/100, SVHN, STL-10) on fake on-disk files.

No network here, so each test writes a few images in the data set's own published format
under a temporary ``dataset.root`` and checks what ``prepare`` makes of them: pixel layout
(channel order and transposes), label mapping, splits, ids and class names.
"""

import os
import pickle
import urllib.error

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.cifar
import torchvision.datasets.stl10
import torchvision.datasets.svhn

from pipeline import PipelineError
from pipeline.io import load_prepared
from pipeline.prepare import PrepareParams, prepare

N_TRAIN, N_TEST, N_UNLABELED = 6, 4, 5
# One pixel with distinct channel values, at a non-square position, catches a swapped
# height/width and a wrong channel order alike.
PIXEL_AT, PIXEL = (1, 2), (10, 20, 30)


def exists_only(fpath, md5=None):
    return os.path.isfile(fpath)


@pytest.fixture(autouse=True)
def skip_md5(monkeypatch):
    """Fake files cannot match torchvision's md5 sums: keep its file-exists check, drop the md5.

    Patching the module-level ``check_integrity`` (rather than each class's
    ``_check_integrity``) also covers CIFAR's separate metadata check, and a missing file
    still fails the way it does for users, so the missing-file tests exercise the real path.
    """
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn,
                   torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", exists_only)


def fake_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 random images; image 0 carries ``PIXEL`` at ``PIXEL_AT``."""
    x = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x[0, PIXEL_AT[0], PIXEL_AT[1]] = PIXEL
    return x


def check_common(data, shape: tuple[int, ...], splits: list[str]):
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
    assert data.ids.dtype == np.int64
    assert data.images.shape == shape
    assert list(data.split) == splits
    np.testing.assert_array_equal(data.ids, np.arange(len(splits)))
    assert tuple(int(v) for v in data.images[0, PIXEL_AT[0], PIXEL_AT[1]]) == PIXEL


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100

def cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 3072) rows as the CIFAR files store them: 1024 red, then green, then blue bytes,
    each channel row-major (documented at https://www.cs.toronto.edu/~kriz/cifar.html)."""
    return np.stack([np.concatenate([img[:, :, ch].ravel() for ch in range(3)]) for img in x])


def dump(path, obj):
    # The CIFAR "python version" files are pickles by their publisher's format; our own
    # outputs never use pickle.
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root, x_train, y_train, x_test, y_test, classes):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    # Five training batches of uneven size: the loader must concatenate them in order.
    bounds = [0, 2, 3, 4, 5, len(x_train)]
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        dump(d / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                         "labels": list(y_train[lo:hi]),
                                         "data": cifar_rows(x_train[lo:hi])})
    dump(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": list(y_test),
                            "data": cifar_rows(x_test)})
    dump(d / "batches.meta", {"label_names": classes, "num_cases_per_batch": 2, "num_vis": 3072})


def write_cifar100(root, x_train, y_train, x_test, y_test, classes):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        dump(d / name, {"batch_label": name, "fine_labels": list(y),
                        "coarse_labels": [int(v) // 5 for v in y], "data": cifar_rows(x)})
    dump(d / "meta", {"fine_label_names": classes,
                      "coarse_label_names": [f"super{i}" for i in range(20)]})


def test_cifar_rows_follow_the_published_layout():
    x = fake_images(1, 32, 0)
    row = cifar_rows(x)[0]
    r, c = PIXEL_AT
    assert [row[ch * 1024 + r * 32 + c] for ch in range(3)] == list(PIXEL)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_local_files(tmp_path, name):
    x_train, x_test = fake_images(N_TRAIN, 32, 1), fake_images(N_TEST, 32, 2)
    if name == "cifar10":
        y_train, y_test = [3, 0, 9, 1, 1, 7], [9, 0, 2, 5]
        classes, write = CIFAR10_CLASSES, write_cifar10
    else:
        y_train, y_test = [99, 0, 42, 7, 7, 63], [1, 98, 50, 0]
        classes, write = [f"fine{i:02d}" for i in range(100)], write_cifar100
    write(tmp_path, x_train, y_train, x_test, y_test, classes)

    data = prepare(PrepareParams(name=name, root=str(tmp_path)), tmp_path / "o.npz")
    check_common(data, (10, 32, 32, 3), ["train"] * N_TRAIN + ["test"] * N_TEST)
    np.testing.assert_array_equal(data.images, np.concatenate([x_train, x_test]))
    assert data.labels.tolist() == y_train + y_test
    assert data.classes == classes
    # What later stages read back is the same.
    again = load_prepared(tmp_path / "o.npz")
    np.testing.assert_array_equal(again.images, data.images)
    assert again.classes == classes


def test_cifar10_subsampling_keeps_ids_and_pixels(tmp_path):
    x_train, x_test = fake_images(N_TRAIN, 32, 3), fake_images(N_TEST, 32, 4)
    y_train, y_test = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9]
    write_cifar10(tmp_path, x_train, y_train, x_test, y_test, CIFAR10_CLASSES)
    full = np.concatenate([x_train, x_test])
    p = PrepareParams(name="cifar10", root=str(tmp_path), max_train=4, max_test=3, seed=5)
    data = prepare(p, tmp_path / "o.npz")
    assert (data.split == "train").sum() == 4 and (data.split == "test").sum() == 3
    assert data.images.shape == (7, 32, 32, 3)
    # ids keep their meaning (index in the full set): each kept image is that image.
    assert set(data.ids[data.split == "train"]) < set(range(N_TRAIN))
    assert set(data.ids[data.split == "test"]) < set(range(N_TRAIN, N_TRAIN + N_TEST))
    np.testing.assert_array_equal(data.images, full[data.ids])
    assert data.labels.tolist() == [(y_train + y_test)[i] for i in data.ids]
    # The same seed draws the same subset; limits above the split size keep everything.
    again = prepare(p, tmp_path / "o2.npz")
    np.testing.assert_array_equal(again.ids, data.ids)
    everything = prepare(PrepareParams(name="cifar10", root=str(tmp_path), max_train=100,
                                       max_test=4), tmp_path / "o3.npz")
    np.testing.assert_array_equal(everything.ids, np.arange(N_TRAIN + N_TEST))


# ------------------------------------------------------------------------------ SVHN

def write_svhn(root, split, x, digits):
    """``<split>_32x32.mat``: X is (32, 32, 3, N) as MATLAB stores it; y is (N, 1), 10 for 0."""
    X = np.ascontiguousarray(x.transpose(1, 2, 3, 0))
    y = np.asarray([[10 if d == 0 else d] for d in digits], dtype=np.uint8)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
    return X


def test_svhn_from_local_files(tmp_path):
    x_train, x_test = fake_images(N_TRAIN, 32, 5), fake_images(N_TEST, 32, 6)
    d_train, d_test = [0, 1, 9, 0, 5, 3], [2, 0, 8, 0]
    X = write_svhn(tmp_path, "train", x_train, d_train)
    write_svhn(tmp_path, "test", x_test, d_test)
    assert tuple(X[PIXEL_AT[0], PIXEL_AT[1], :, 0]) == PIXEL  # the file's own layout

    data = prepare(PrepareParams(name="svhn", root=str(tmp_path)), tmp_path / "o.npz")
    check_common(data, (10, 32, 32, 3), ["train"] * N_TRAIN + ["test"] * N_TEST)
    np.testing.assert_array_equal(data.images, np.concatenate([x_train, x_test]))
    # The files say 10 for the digit 0; the prepared labels are the digits themselves.
    assert data.labels.tolist() == d_train + d_test
    assert data.classes == [str(i) for i in range(10)]


# ---------------------------------------------------------------------------- STL-10

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]


def stl10_bytes(x: np.ndarray) -> bytes:
    """Each image as three 96x96 channel planes (red, green, blue), each column-major
    (documented at https://cs.stanford.edu/~acoates/stl10/)."""
    return b"".join(img[:, :, ch].ravel(order="F").tobytes() for img in x for ch in range(3))


def write_stl10(root, x_train, y_train, x_test, y_test, x_unlabeled, class_names=True):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    (d / "train_X.bin").write_bytes(stl10_bytes(x_train))
    (d / "train_y.bin").write_bytes(bytes(v + 1 for v in y_train))  # 1-based on disk
    (d / "test_X.bin").write_bytes(stl10_bytes(x_test))
    (d / "test_y.bin").write_bytes(bytes(v + 1 for v in y_test))
    (d / "unlabeled_X.bin").write_bytes(stl10_bytes(x_unlabeled))
    if class_names:
        (d / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")


def test_stl10_bytes_follow_the_published_layout():
    raw = stl10_bytes(fake_images(1, 96, 0))
    r, c = PIXEL_AT
    assert [raw[ch * 96 * 96 + c * 96 + r] for ch in range(3)] == list(PIXEL)


@pytest.mark.parametrize("unlabeled", [False, True])
def test_stl10_from_local_files(tmp_path, unlabeled):
    x_train, x_test = fake_images(N_TRAIN, 96, 7), fake_images(N_TEST, 96, 8)
    x_unlabeled = fake_images(N_UNLABELED, 96, 9)
    y_train, y_test = [0, 9, 4, 4, 1, 7], [9, 0, 3, 6]
    write_stl10(tmp_path, x_train, y_train, x_test, y_test, x_unlabeled)

    p = PrepareParams(name="stl10", root=str(tmp_path), stl10_unlabeled=unlabeled)
    data = prepare(p, tmp_path / "o.npz")
    splits = ["train"] * N_TRAIN + ["test"] * N_TEST
    images, labels = [x_train, x_test], y_train + y_test
    if unlabeled:
        splits += ["unlabeled"] * N_UNLABELED
        images.append(x_unlabeled)
        labels += [-1] * N_UNLABELED
    check_common(data, (len(splits), 96, 96, 3), splits)
    np.testing.assert_array_equal(data.images, np.concatenate(images))
    assert data.labels.tolist() == labels
    assert data.classes == STL10_CLASSES
    if unlabeled:
        unl = data.subset("unlabeled")
        np.testing.assert_array_equal(unl.ids, np.arange(10, 10 + N_UNLABELED))
        np.testing.assert_array_equal(unl.images[0], x_unlabeled[0])


def test_stl10_without_class_names_numbers_the_classes(tmp_path):
    write_stl10(tmp_path, fake_images(2, 96, 1), [0, 9], fake_images(1, 96, 2), [5],
                fake_images(1, 96, 3), class_names=False)
    data = prepare(PrepareParams(name="stl10", root=str(tmp_path)), tmp_path / "o.npz")
    assert data.classes == [str(i) for i in range(10)]
    assert data.labels.tolist() == [0, 9, 5]


# -------------------------------------------------------------------- missing files

def make_partial(name, root):
    """Write only the training files of ``name``, so that its test split is missing."""
    x, y = fake_images(N_TRAIN, 32, 0), [0, 1, 2, 3, 4, 5]
    if name == "cifar10":
        write_cifar10(root, x, y, x, y, CIFAR10_CLASSES)
        (root / "cifar-10-batches-py" / "test_batch").unlink()
    elif name == "cifar100":
        write_cifar100(root, x, y, x, y, [str(i) for i in range(100)])
        (root / "cifar-100-python" / "test").unlink()
    elif name == "svhn":
        write_svhn(root, "train", x, y)
    else:
        x = fake_images(2, 96, 0)
        write_stl10(root, x, [0, 1], x, [0, 1], x)
        (root / "stl10_binary" / "test_y.bin").unlink()


@pytest.mark.parametrize("name, split", [
    ("cifar10", "train"), ("cifar100", "train"), ("svhn", "train"), ("stl10", "train"),
    ("cifar10", "test"), ("cifar100", "test"), ("svhn", "test"), ("stl10", "test"),
])
def test_missing_files_name_set_split_root_and_download(tmp_path, name, split):
    root = tmp_path / "data"
    root.mkdir()
    if split == "test":
        make_partial(name, root)
    out = tmp_path / "o.npz"
    with pytest.raises(PipelineError) as err:
        prepare(PrepareParams(name=name, root=str(root)), out)
    # torchvision checks every CIFAR and STL-10 file whichever split is asked for, so those
    # fail on the first split loaded, train; SVHN has one file per split.
    failing = split if name == "svhn" else "train"
    message = str(err.value)
    assert message.startswith(
        f"{name} files not found or corrupted under dataset.root {str(root)!r} (while loading "
        f"its {failing} split); set dataset.download: true to fetch it"
    )
    assert "\n" not in message
    assert not out.exists()


def test_cifar_metadata_missing_is_reported(tmp_path):
    x = fake_images(N_TRAIN, 32, 0)
    write_cifar10(tmp_path, x, [0] * N_TRAIN, x, [0] * N_TRAIN, CIFAR10_CLASSES)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(PipelineError, match=r"^cifar10 files not found or corrupted .*train split.*"
                                            r"dataset.download: true.*metadata file"):
        prepare(PrepareParams(name="cifar10", root=str(tmp_path)), tmp_path / "o.npz")


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", offline)
    out = tmp_path / "o.npz"
    with pytest.raises(PipelineError) as err:
        prepare(PrepareParams(name="svhn", root=str(tmp_path / "new"), download=True), out)
    assert str(err.value) == (
        f"svhn: download into {str(tmp_path / 'new')!r} failed: <urlopen error no network>"
    )
    assert not out.exists()
