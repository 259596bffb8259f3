"""The prepare stage: each loader's output format, and a clear error for each bad input."""

import gzip
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.config import build
from pipeline.io import load_prepared
from pipeline.prepare import PrepareParams, SyntheticParams, prepare


def params(**kw) -> PrepareParams:
    return PrepareParams(**kw)


def check_format(data):
    assert data.images.dtype == np.uint8 and data.images.ndim == 4
    assert data.labels.dtype == np.int64 and data.ids.dtype == np.int64
    assert len(np.unique(data.ids)) == len(data.ids)
    assert set(np.unique(data.split)) <= {"train", "test", "unlabeled"}


def test_digits_is_the_offline_default(tmp_path):
    data = prepare(params(), tmp_path / "d.npz")
    check_format(data)
    assert data.images.shape == (1797, 8, 8, 1)
    assert data.images.max() == 255
    n_test = (data.split == "test").sum()
    assert 0.19 < n_test / 1797 < 0.21
    # stratified: every class in both splits
    for s in ("train", "test"):
        assert set(data.labels[data.split == s]) == set(range(10))
    again = load_prepared(tmp_path / "d.npz")
    np.testing.assert_array_equal(again.images, data.images)
    np.testing.assert_array_equal(again.split, data.split)


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    a = prepare(params(seed=1), tmp_path / "a.npz")
    b = prepare(params(seed=1), tmp_path / "b.npz")
    c = prepare(params(seed=2), tmp_path / "c.npz")
    np.testing.assert_array_equal(a.split, b.split)
    assert (a.split != c.split).any()


def test_synthetic_rgb_and_subsampling(tmp_path):
    p = params(name="synthetic", synthetic=SyntheticParams(classes=3, per_class=10, size=9,
                                                          channels=3), max_train=12)
    data = prepare(p, tmp_path / "s.npz")
    check_format(data)
    assert data.images.shape[1:] == (9, 9, 3)
    assert (data.split == "train").sum() == 12
    assert (data.split == "test").sum() == 6


def write_npz(path, **arrays):
    base = dict(x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.array([0, 1, 2, 1]),
                x_test=np.zeros((2, 5, 5), np.uint8), y_test=np.array([0, 2]))
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_npz_loader(tmp_path):
    path = write_npz(tmp_path / "x.npz", x_train=np.random.rand(4, 5, 5, 3).astype(np.float32),
                     x_test=np.random.rand(2, 5, 5, 3).astype(np.float32))
    data = prepare(params(name="npz", root=str(path)), tmp_path / "out.npz")
    check_format(data)
    assert data.images.shape == (6, 5, 5, 3)
    assert data.classes == ["0", "1", "2"]
    assert list(data.split) == ["train"] * 4 + ["test"] * 2


@pytest.mark.parametrize("arrays, message", [
    ({"y_test": np.array([0, 5])}, "y_test label 5 out of range [-1, 2]"),
    ({"y_train": np.array([0, 1, -3, 1])}, "y_train label -3 out of range"),
    ({"x_test": None}, "missing arrays ['x_test']"),
    ({"x_train": np.zeros((4, 5, 5, 2), np.uint8)}, "must be NHW or NHWC with 1 or 3 channels"),
    ({"x_train": np.full((4, 5, 5), 7.0)}, "x_train must be uint8 or float in [0, 1]"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = write_npz(tmp_path / "x.npz", **arrays)
    out = tmp_path / "out.npz"
    with pytest.raises(PipelineError) as err:
        prepare(params(name="npz", root=str(path)), out)
    assert message in str(err.value)
    assert not out.exists()


def make_folder(root, size=(6, 6), mode="RGB", classes=("cat", "dog"), per=3):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per):
                Image.new(mode, size, color=(i * 40) if mode == "L" else (i * 40, 0, 0)).save(
                    d / f"{i}.png")
    return root


def test_imagefolder_loader_and_resize(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    check_format(data)
    assert data.images.shape == (12, 6, 6, 3)
    assert data.classes == ["cat", "dog"]
    assert list(data.labels[data.split == "train"]) == [0, 0, 0, 1, 1, 1]
    # Mixed sizes are fine once resized.
    Image.new("RGB", (9, 7)).save(root / "train" / "cat" / "big.png")
    data = prepare(params(name="imagefolder", root=str(root), resize=8), tmp_path / "r.npz")
    assert data.images.shape[1:] == (8, 8, 3)


def test_imagefolder_grey_stays_one_channel(tmp_path):
    root = make_folder(tmp_path / "imgs", mode="L")
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    assert data.images.shape == (12, 6, 6, 1)


def test_imagefolder_from_tar_archive(tmp_path):
    root = make_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    a = prepare(params(name="imagefolder", root=str(root)), tmp_path / "a.npz")
    b = prepare(params(name="imagefolder", root=str(archive)), tmp_path / "b.npz")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_imagefolder_errors(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "o.npz"
    Image.new("RGB", (9, 7)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(PipelineError, match=r"big.png is 9x7 but .* is 6x6; set dataset.resize"):
        prepare(params(name="imagefolder", root=str(root)), out)
    (root / "train" / "cat" / "big.png").write_bytes(b"not an image")
    with pytest.raises(PipelineError, match=r"unreadable image .*big.png"):
        prepare(params(name="imagefolder", root=str(root)), out)
    (root / "train" / "cat" / "big.png").unlink()
    (root / "test" / "cow").mkdir()
    Image.new("RGB", (6, 6)).save(root / "test" / "cow" / "0.png")
    with pytest.raises(PipelineError, match=r"test classes \['cow'\] have no training folder"):
        prepare(params(name="imagefolder", root=str(root)), out)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"missing folder .*flat/test"):
        prepare(params(name="imagefolder", root=str(flat)), out)
    assert not out.exists()


def test_missing_root_and_unknown_name(tmp_path):
    with pytest.raises(PipelineError, match=r"dataset.root '.*nowhere' does not exist"):
        prepare(params(name="cifar10", root=str(tmp_path / "nowhere")), tmp_path / "o.npz")
    with pytest.raises(PipelineError, match="dataset.root is required for dataset.name='mnist'"):
        prepare(params(name="mnist"), tmp_path / "o.npz")
    with pytest.raises(PipelineError, match="unknown dataset.name 'imagenet'; known: cifar10"):
        prepare(params(name="imagenet"), tmp_path / "o.npz")


def _idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_style_from_local_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = prepare(params(name=name, root=str(tmp_path)), tmp_path / "o.npz")
    check_format(data)
    assert data.images.shape == (10, 28, 28, 1)
    assert list(data.labels[:6]) == [0, 1, 2, 3, 4, 5]
    assert len(data.classes) == 10


def test_torchvision_set_missing_files_is_actionable(tmp_path):
    with pytest.raises(PipelineError, match=r"mnist files not found .*\(while loading its "
                                            r"train split\); set dataset.download"):
        prepare(params(name="mnist", root=str(tmp_path)), tmp_path / "o.npz")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys):
    rc = main(["prepare", "--params", '{"name": "npz", "root": "missing.npz"}',
               "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        "error: dataset.root 'missing.npz' does not exist (dataset.name='npz'); "
        "point it at the files or set dataset.download: true"
    ]
    assert not (tmp_path / "o.npz").exists()


def test_params_from_flat_config():
    p = build(PrepareParams, {"name": "synthetic", "synthetic.classes": 5, "seed": 3})
    assert p.synthetic.classes == 5 and p.seed == 3
