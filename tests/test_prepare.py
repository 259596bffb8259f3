"""The prepare stage: each loader's output format, and a clear error for each bad input."""

import gzip
import io
import re
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.config import build
from pipeline.io import Prepared, load_prepared, save_prepared
from pipeline.prepare import PrepareParams, SyntheticParams, check_source, prepare


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
    flat.mkdir()
    with pytest.raises(PipelineError, match=r"missing folder '.*flat/train'; expected <root>/"
                                            r"train/<class>/\*, optionally <root>/test/"):
        prepare(params(name="imagefolder", root=str(flat)), out)
    (flat / "train").mkdir()  # test/ is optional now; train/ still needs a class
    with pytest.raises(PipelineError, match=r"no images in '.*flat/train'/<class>/$"):
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
        "point it at the files"
    ]
    assert not (tmp_path / "o.npz").exists()


def test_params_from_flat_config():
    p = build(PrepareParams, {"name": "synthetic", "synthetic.classes": 5, "seed": 3})
    assert p.synthetic.classes == 5 and p.seed == 3


# ------------------------------------------------------------------- damaged files


def tar_of(root, archive, mode="w"):
    with tarfile.open(archive, mode) as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    return archive


def fails_cleanly(root, match, tmp_path, name="imagefolder"):
    """prepare raises one line matching ``match`` and writes nothing."""
    out = tmp_path / "o.npz"
    with pytest.raises(PipelineError, match=match) as err:
        prepare(params(name=name, root=str(root)), out)
    assert "\n" not in str(err.value) and "<_io" not in str(err.value)
    assert not out.exists()
    return str(err.value)


def test_tar_damaged_after_its_first_members_is_an_error_not_fewer_images(tmp_path):
    archive = tar_of(make_folder(tmp_path / "imgs"), tmp_path / "imgs.tar")
    raw = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    victim = members[5]  # a header in the middle: tarfile alone would stop here quietly
    raw[victim.offset:victim.offset + 100] = b"\xff" * 100
    archive.write_bytes(bytes(raw))
    fails_cleanly(archive, rf"imgs.tar': damaged archive, unreadable after member "
                           rf"'{members[4].name}' \(ReadError: bad header at byte "
                           rf"{victim.offset}", tmp_path)


def test_tar_with_a_zeroed_header_in_the_middle_is_an_error(tmp_path):
    archive = tar_of(make_folder(tmp_path / "imgs"), tmp_path / "imgs.tar")
    with tarfile.open(archive) as tar:
        victim = tar.getmembers()[5]
    raw = bytearray(archive.read_bytes())
    raw[victim.offset:victim.offset + 1024] = bytes(1024)  # reads as the end marker
    archive.write_bytes(bytes(raw))
    fails_cleanly(archive, r"damaged archive.*data after the end-of-archive marker", tmp_path)


def test_tar_cut_at_a_member_boundary_is_an_error(tmp_path):
    archive = tar_of(make_folder(tmp_path / "imgs"), tmp_path / "imgs.tar")
    with tarfile.open(archive) as tar:
        cut = tar.getmembers()[6].offset
    archive.write_bytes(archive.read_bytes()[:cut])
    fails_cleanly(archive, "damaged archive.*ends without its end marker", tmp_path)


def test_truncated_and_bit_flipped_tar_gz_are_errors(tmp_path):
    archive = tar_of(make_folder(tmp_path / "imgs", per=20), tmp_path / "imgs.tar.gz", "w:gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) * 2 // 3])
    fails_cleanly(archive, r"imgs.tar.gz': damaged archive, unreadable after member .*EOFError",
                  tmp_path)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    archive.write_bytes(bytes(flipped))
    fails_cleanly(archive, r"imgs.tar.gz': damaged archive, unreadable", tmp_path)


def test_a_file_that_is_no_tar_is_one_line(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"hello")
    fails_cleanly(tmp_path / "x.tar.gz", r"x.tar.gz' is a file but not a readable tar archive "
                                         r"\(plain, gzip, bzip2 or xz\): file could not be "
                                         r"opened successfully$", tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "test" / "dog" / "empty").mkdir()  # not a class folder: ignored by the layout
    (root / "train" / "emu").mkdir()
    fails_cleanly(root, r"class folder '.*train/emu' holds no images; add images or remove",
                  tmp_path)
    archive = tar_of(root, tmp_path / "imgs.tar")
    fails_cleanly(archive, r"class folder 'train/emu' holds no images", tmp_path)


def test_zero_byte_and_garbage_images_name_the_file(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "0.png").write_bytes(b"")
    fails_cleanly(root, r"unreadable image .*cat/0.png: the file is empty \(0 bytes\)$",
                  tmp_path)
    (root / "train" / "cat" / "0.png").write_bytes(b"garbage")
    archive = tar_of(root, tmp_path / "imgs.tar")
    fails_cleanly(archive, r"^unreadable image train/cat/0.png: not a format Pillow can read",
                  tmp_path)


def test_truncated_and_garbage_npz_are_one_line(tmp_path):
    path = write_npz(tmp_path / "x.npz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    msg = fails_cleanly(path, r"x.npz': not a .npz file \(no zip archive found: wrong format, "
                              r"or truncated\)$", tmp_path, "npz")
    assert "allow_pickle" not in msg
    path.write_bytes(b"\x93NUMPY garbage")
    fails_cleanly(path, "not a .npz file", tmp_path, "npz")


@pytest.mark.parametrize("arrays, message", [
    ({"classes": np.array(["a", 1, None], dtype=object)},
     r"x.npz: array 'classes' holds Python objects \(dtype object\); store numbers or strings$"),
    ({"y_train": np.array([0, 1, 2, 1], dtype=object)}, r"array 'y_train' holds Python objects"),
    ({"x_train": np.zeros((0, 5, 5), np.uint8), "y_train": np.zeros(0, np.int64)},
     r"x.npz: x_train holds no images \(shape \(0, 5, 5\)\)$"),
    ({"x_test": np.zeros((2, 0, 5), np.float32)}, r"x_test holds no images"),
    ({"x_train": np.array([np.nan, 0.5, 0, 0]).reshape(4, 1, 1).repeat(5, 1).repeat(5, 2)},
     r"x_train contains 25 NaN values; images must be uint8 or float in \[0, 1\]$"),
    ({"x_test": np.full((2, 5, 5), np.inf)}, r"x_test contains 50 infinite values"),
    ({"classes": np.zeros((3, 2), np.int64)}, r"classes must be a 1-D array of names"),
])
def test_npz_object_empty_and_nan_arrays(tmp_path, arrays, message):
    fails_cleanly(write_npz(tmp_path / "x.npz", **arrays), message, tmp_path, "npz")


def test_mnist_names_the_missing_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    (raw / "t10k-labels-idx1-ubyte").unlink()  # torchvision checks all four files
    msg = fails_cleanly(tmp_path, r"\(while loading its train split\); set dataset.download: "
                                  r"true to fetch it \(missing '.*MNIST/raw/t10k-labels-idx1-"
                                  r"ubyte'\)$", tmp_path, "mnist")
    assert "download=True" not in msg


def test_prepare_logs_one_summary_line(tmp_path, capsys):
    prepare(params(name="synthetic", synthetic=SyntheticParams(classes=3, per_class=10)),
            tmp_path / "s.npz")
    assert capsys.readouterr().err.splitlines() == [
        "prepared 30 images (train 24, test 6), 3 classes, 16x16x1 uint8"]


@pytest.mark.parametrize("name, hint", [("imagefolder", False), ("npz", False), ("cifar10", True)])
def test_missing_root_hints_download_only_for_torchvision_sets(tmp_path, name, hint):
    params = PrepareParams(name=name, root=str(tmp_path / "none"), download=True)
    if hint:
        check_source(params)  # torchvision may fetch it into root
        params = PrepareParams(name=name, root=str(tmp_path / "none"))
    with pytest.raises(PipelineError) as err:
        check_source(params)
    message = str(err.value)
    assert message.startswith(f"dataset.root '{tmp_path / 'none'}' does not exist")
    assert ("dataset.download" in message) == hint


# ------------------------------------------------------------ image modes, names, links


def folder_of(root, images, classes=("cat",)):
    """root/{train,test}/<class>/<name> for every (name, PIL image) of ``images``."""
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for name, img in images.items():
                img.save(root / split / c / name)
    return root


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 257, 40000, 65535]], np.uint16)
    root = folder_of(tmp_path / "imgs", {"0.png": Image.fromarray(pixels)})
    assert Image.open(root / "train" / "cat" / "0.png").mode == "I;16"
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    assert data.images.shape == (2, 1, 4, 1)
    assert data.images[0, 0, :, 0].tolist() == [0, 1, 155, 255]  # Image.convert("L"): 255s


def test_16bit_pgm_opens_as_mode_i_and_is_scaled_the_same(tmp_path):
    pgm = b"P5\n2 1\n65535\n" + np.array([40000, 65535], ">u2").tobytes()
    root = folder_of(tmp_path / "imgs", {})
    for split in ("train", "test"):
        (root / split / "cat" / "0.pgm").write_bytes(pgm)
    assert Image.open(root / "train" / "cat" / "0.pgm").mode == "I"
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    assert data.images[0, 0, :, 0].tolist() == [155, 255]


def test_32bit_integer_image_beyond_16_bits_is_refused(tmp_path):
    wide = Image.fromarray(np.array([[-5, 70000]], np.int32))
    root = folder_of(tmp_path / "imgs", {"0.tif": wide})
    fails_cleanly(root, r"^unreadable image .*train/cat/0.tif: Pillow mode 'I' \(32-bit integer\)"
                        r" with values in \[-5, 70000\], outside the 16-bit range \[0, 65535\]; "
                        r"save it as 8-bit grey or RGB \(or 16-bit grey\)$", tmp_path)


@pytest.mark.parametrize("mode, pixel", [("F", 0.5), ("LAB", (50, 10, 10))])
def test_float_and_lab_images_are_refused_naming_the_file(tmp_path, capsys, mode, pixel):
    root = folder_of(tmp_path / "imgs", {"0.tif": Image.new(mode, (2, 2), pixel)})
    assert Image.open(root / "train" / "cat" / "0.tif").mode == mode
    out = tmp_path / "o.npz"
    rc = main(["prepare", "--params", f'{{"name": "imagefolder", "root": "{root}"}}',
               "--out", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unreadable image {root}/train/cat/0.tif: Pillow mode '{mode}' is not "
        "supported; save it as 8-bit grey or RGB (or 16-bit grey)"]
    assert not out.exists()


def test_alpha_palette_and_bilevel_images_follow_the_mode_rule(tmp_path):
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.info["transparency"] = 1  # dropped with alpha, like RGBA's
    images = {
        "a_rgba.png": Image.new("RGBA", (2, 2), (10, 20, 30, 0)),  # alpha dropped, no compositing
        "b_palette.gif": palette,
        "c_grey_alpha.png": Image.new("LA", (2, 2), (90, 0)),  # grey, promoted to RGB
        "d_bilevel.png": Image.new("1", (2, 2), 1),
        "e_cmyk.tif": Image.new("CMYK", (2, 2), (0, 255, 255, 0)),
    }
    root = folder_of(tmp_path / "imgs", images)
    assert [Image.open(root / "train" / "cat" / n).mode for n in images] == [
        "RGBA", "P", "LA", "1", "CMYK"]
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    assert data.images.shape == (10, 2, 2, 3)
    assert data.images[:5, 0, 0].tolist() == [[10, 20, 30], [200, 10, 10], [90, 90, 90],
                                              [255, 255, 255], [255, 0, 0]]


def test_long_class_names_are_kept_whole(tmp_path):
    # Stored as U64, these three classes came back as two (cut to their common 64 characters).
    names = ["n" * 64 + suffix for suffix in ("-one-x", "-one-y", "-two-long-suffix")]
    root = make_folder(tmp_path / "imgs", classes=names, per=1)
    data = prepare(params(name="imagefolder", root=str(root)), tmp_path / "o.npz")
    assert data.classes == sorted(names)
    assert load_prepared(tmp_path / "o.npz").classes == sorted(names)


def test_prepared_files_with_fixed_width_or_no_class_names_load(tmp_path):
    old = tmp_path / "old.npz"  # written before class names were stored whole
    np.savez(old, images=np.zeros((2, 1, 1, 1), np.uint8), labels=np.array([0, 1]),
             split=np.array(["train", "test"], dtype="U9"), ids=np.arange(2),
             classes=np.asarray(["cat", "dog"], dtype="U64"))
    assert load_prepared(old).classes == ["cat", "dog"]
    none = Prepared(np.zeros((2, 1, 1, 1), np.uint8), np.array([-1, -1]),
                    np.array(["unlabeled"] * 2), np.arange(2), [])
    save_prepared(tmp_path / "none.npz", none)
    assert load_prepared(tmp_path / "none.npz").classes == []


def test_class_folders_equal_after_nfc_normalisation_are_refused(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    root = make_folder(tmp_path / "imgs", classes=(composed, decomposed), per=1)
    message = (r"imagefolder: class folders '.*train/cafe\u0301' and '.*train/caf\u00e9' differ"
               r" only in Unicode normalisation \('cafe\\u0301' vs 'caf\\xe9'\); rename one$")
    fails_cleanly(root, "^" + message, tmp_path)
    fails_cleanly(tar_of(root, tmp_path / "imgs.tar"), message, tmp_path)


@pytest.mark.parametrize("classes, message", [
    (["cat", "cat", "dog"], r"class name 'cat' appears twice in classes; class names must be "
                            r"unique$"),
    (["caf\u00e9", "cafe\u0301", "dog"], r"class names 'caf\\xe9' and 'cafe\\u0301' are one name "
                                         r"after Unicode normalisation in classes"),
    (["cat", "dog"], r"y_train label 2 out of range \[-1, 1\]$"),  # fewer names than labels
])
def test_npz_class_names_must_be_unique_and_enough(tmp_path, classes, message):
    path = write_npz(tmp_path / "x.npz", classes=np.array(classes))
    fails_cleanly(path, f"^{re.escape(str(path))}: {message}", tmp_path, "npz")


@pytest.mark.parametrize("target, reason", [
    ("loop.png", "Too many levels of symbolic links"), ("gone.png", "No such file or directory")])
def test_broken_image_symlink_is_an_error_naming_it(tmp_path, target, reason):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "loop.png").symlink_to(target)
    fails_cleanly(root, rf"^unreadable image .*/train/cat/loop.png: broken symbolic link to "
                        rf"'{target}' \({reason}\)$", tmp_path)


def test_hidden_and_non_image_entries_keep_their_rules(tmp_path):
    root = make_folder(tmp_path / "imgs")
    cat = root / "train" / "cat"
    (cat / ".hidden.png").symlink_to(".hidden.png")  # hidden: ignored, even when broken
    (cat / ".DS_Store").write_bytes(b"junk")
    (cat / "link").symlink_to("nowhere")  # a broken link without an image suffix: ignored
    good = make_folder(tmp_path / "good")
    np.testing.assert_array_equal(
        prepare(params(name="imagefolder", root=str(root)), tmp_path / "a.npz").images,
        prepare(params(name="imagefolder", root=str(good)), tmp_path / "b.npz").images)
    (cat / "notes.txt").write_text("hello")  # a folder's files are all images to be read...
    fails_cleanly(root, r"^unreadable image .*cat/notes.txt: not a format Pillow can read",
                  tmp_path)
    (cat / "link").unlink()
    (cat / ".hidden.png").unlink()
    archive = tar_of(root, tmp_path / "imgs.tar")  # ...a tar's, those with image suffixes
    assert len(prepare(params(name="imagefolder", root=str(archive)), tmp_path / "c.npz").ids) == 12


def test_tar_links_are_followed_within_the_archive_or_refused(tmp_path):
    root = make_folder(tmp_path / "imgs")
    cat = root / "train" / "cat"
    (cat / "hard.png").hardlink_to(cat / "0.png")  # tar stores it as a link member
    (cat / "soft.png").symlink_to("2.png")
    data = prepare(params(name="imagefolder", root=str(tar_of(root, tmp_path / "a.tar"))),
                   tmp_path / "a.npz")
    assert (data.split == "train").sum() == 8
    (cat / "out.png").symlink_to(tmp_path / "elsewhere.png")
    Image.new("RGB", (6, 6)).save(tmp_path / "elsewhere.png")
    fails_cleanly(tar_of(root, tmp_path / "b.tar"),
                  rf"^unreadable image train/cat/out.png: symbolic link to "
                  rf"'{tmp_path}/elsewhere.png' does not lead to a file in the archive "
                  r"\(archive with tar --dereference\)$", tmp_path)


def _file_size_limit(limit: int):
    """A child process whose files may not grow past ``limit`` bytes: writes then fail with
    EFBIG, as a full disk fails them with ENOSPC (SIGXFSZ ignored, so the write returns)."""
    import resource
    import signal

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_a_write_that_runs_out_of_space_is_one_line_and_leaves_nothing(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "results" / "prepared"
    cmd = [sys.executable, "-m", "pipeline", "prepare", "--out", str(out),
           "--params", json.dumps({"name": "digits"})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          preexec_fn=_file_size_limit(20_000), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: cannot write results/prepared: File too large"]
    assert list(out.parent.iterdir()) == []  # neither prepared nor its temporary file


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    from pipeline.prepare import _decode

    img = np.zeros((4, 8), np.uint8)
    img[0, :] = 255  # a bright top row, stored sideways with "rotate 90 CW to view"
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(buf, format="PNG", exif=exif)
    upright = _decode("photo.png", buf.getvalue(), None)
    assert upright.shape == (8, 4) and (upright[:, -1] == 255).all()
