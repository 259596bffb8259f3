"""Prepare in bounded memory: the written folder against in-memory references, image folders
as users have them (unlabeled/, no test/), kept paths, resizing, and each bad input."""

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.io import load_prepared
from pipeline.prepare import PrepareParams, SyntheticParams, load_digits, prepare
from pipeline.prepare.splits import keep_rows, stratified_split


def same_set(data, images, labels, split, ids):
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.split, split)
    np.testing.assert_array_equal(data.ids, ids)


# ------------------------------------------------------------ against in-memory references


def test_digits_folder_holds_the_in_memory_set(tmp_path):
    p = PrepareParams(seed=4)
    prepare(p, tmp_path / "prepared")
    data, ref = load_prepared(tmp_path / "prepared"), load_digits(p)
    same_set(data, ref.images, ref.labels, ref.split, ref.ids)
    assert data.classes == ref.classes and set(data.paths) == {""}


def synthetic_reference(p: PrepareParams):
    """The generator as it was before it wrote in chunks: every image held in memory."""
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
    split = np.where(stratified_split(labels, p.test_fraction, p.seed), "test", "train")
    return np.stack(images), labels, split


@pytest.mark.parametrize("p", [
    PrepareParams(name="synthetic"),
    PrepareParams(name="synthetic", seed=3, test_fraction=0.3,
                  synthetic=SyntheticParams(classes=5, per_class=13, size=9, channels=3,
                                            noise=0.1)),
    # Subsampled, and more rows than one write (1024) holds: chunks and dropped rows.
    PrepareParams(name="synthetic", seed=2, max_train=1500, max_test=7,
                  synthetic=SyntheticParams(classes=3, per_class=700, size=6, channels=3)),
])
def test_synthetic_written_in_chunks_is_the_in_memory_set(tmp_path, p):
    prepare(p, tmp_path / "prepared")
    images, labels, split = synthetic_reference(p)
    keep = keep_rows(split, p)
    same_set(load_prepared(tmp_path / "prepared"), images[keep], labels[keep], split[keep],
             np.flatnonzero(keep))


def cifar_like(root, classes=("bird", "cat", "dog"), train=5, test=2, side=8, seed=0):
    """root/{train,test}/<class>/NNN.png of random RGB pixels (a few grey), counts per class
    growing with the class, so that a mislabelled row shows."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        if not n:
            continue
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(n + i):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                img = Image.fromarray(pixels if j % 3 else pixels[..., 0])  # grey ones too
                img.save(root / split / c / f"{j:03d}.png")
    return root


def reference(root, files):
    """Images (RGB, grey repeated), labels and paths of ``files`` (paths under root), decoded
    one by one with Pillow."""
    classes = sorted({f.split("/")[1] for f in files if f.startswith("train/")})
    images = [np.asarray(Image.open(root / f).convert("RGB")) for f in files]
    labels = [classes.index(f.split("/")[1]) if not f.startswith("unlabeled/") else -1
              for f in files]
    return np.stack(images), np.asarray(labels), classes


def sorted_files(root, *splits):
    return [p.relative_to(root).as_posix() for s in splits
            for p in sorted((root / s).rglob("*.png"), key=lambda p: (p.parent.name, p.name))]


def tar_gz(root, archive, *folders):
    with tarfile.open(archive, "w:gz") as tar:
        for f in folders:
            tar.add(root / f, arcname=f)
    return archive


@pytest.mark.parametrize("from_tar", [False, True])
def test_image_archive_folder_holds_each_image_decoded_alone(tmp_path, from_tar):
    root = cifar_like(tmp_path / "cifar")
    # Test first in the archive: rows still run train, then test.
    source = tar_gz(root, tmp_path / "cifar.tar.gz", "test", "train") if from_tar else root
    prepare(PrepareParams(name="imagefolder", root=str(source)), tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    files = sorted_files(root, "train", "test")
    images, labels, classes = reference(root, files)
    split = ["train"] * 18 + ["test"] * 9
    same_set(data, images, labels, split, np.arange(27))
    assert data.classes == classes == ["bird", "cat", "dog"]
    meta = pq.read_table(tmp_path / "prepared" / "meta.parquet")
    assert meta.column("path").to_pylist() == files
    assert files[:2] == ["train/bird/000.png", "train/bird/001.png"]


def test_subsampled_rows_are_the_full_sets_rows_by_id(tmp_path):
    root = cifar_like(tmp_path / "cifar", train=20, test=6)
    prepare(PrepareParams(name="imagefolder", root=str(root)), tmp_path / "full")
    prepare(PrepareParams(name="imagefolder", root=str(root), max_train=11, max_test=4, seed=7),
            tmp_path / "sub")
    full, sub = load_prepared(tmp_path / "full"), load_prepared(tmp_path / "sub")
    assert (sub.split == "train").sum() == 11 and (sub.split == "test").sum() == 4
    keep = keep_rows(full.split, PrepareParams(max_train=11, max_test=4, seed=7))
    same_set(sub, full.images[keep], full.labels[keep], full.split[keep], full.ids[keep])
    np.testing.assert_array_equal(sub.paths, full.paths[keep])


# ------------------------------------------------------- folders as users have them


def unlabeled(root, n, side=8):
    (root / "unlabeled").mkdir(parents=True)
    for j in range(n):
        Image.new("RGB", (side, side), (j, 2 * j, 3 * j)).save(root / "unlabeled" / f"u{j:02d}.png")
    return root


@pytest.mark.parametrize("from_tar", [False, True])
def test_unlabeled_images_come_last_with_label_minus_one(tmp_path, from_tar):
    root = unlabeled(cifar_like(tmp_path / "imgs"), 5)
    source = (tar_gz(root, tmp_path / "imgs.tar.gz", "unlabeled", "train", "test") if from_tar
              else root)
    data = prepare(PrepareParams(name="imagefolder", root=str(source), max_train=4),
                   tmp_path / "prepared")
    assert [(s, int((data.split == s).sum())) for s in ("train", "test", "unlabeled")] == [
        ("train", 4), ("test", 9), ("unlabeled", 5)]  # max_train leaves unlabeled/ whole
    assert list(data.split[-5:]) == ["unlabeled"] * 5 and (data.labels[-5:] == -1).all()
    assert list(data.paths[-5:]) == [f"unlabeled/u{j:02d}.png" for j in range(5)]
    assert list(data.ids[-5:]) == list(range(27, 32))  # after the 18 train and 9 test images
    assert data.images[-1, 0, 0].tolist() == [4, 8, 12]


@pytest.mark.parametrize("from_tar", [False, True])
def test_without_test_folder_every_class_is_split_by_test_fraction(tmp_path, from_tar):
    root = unlabeled(cifar_like(tmp_path / "imgs", train=10, test=0), 3)
    source = tar_gz(root, tmp_path / "imgs.tar", "train", "unlabeled") if from_tar else root
    p = PrepareParams(name="imagefolder", root=str(source), test_fraction=0.25, seed=5)
    data = prepare(p, tmp_path / "prepared")
    # bird 10, cat 11, dog 12 images: round(0.25 n) of each held out.
    per_class = [[int(((data.split == s) & (data.labels == c)).sum()) for c in range(3)]
                 for s in ("train", "test")]
    assert per_class == [[8, 8, 9], [2, 3, 3]]
    assert (data.split[data.labels == -1] == "unlabeled").all()
    # Rows keep the order of train/ (by class, name); the held-out ones are marked in place.
    assert list(data.paths[:10]) == [f"train/bird/{j:03d}.png" for j in range(10)]
    test = stratified_split(data.labels[:33], 0.25, 5)
    np.testing.assert_array_equal(data.split[:33], np.where(test, "test", "train"))
    again = prepare(p, tmp_path / "again")
    np.testing.assert_array_equal(again.split, data.split)


def test_mixed_sizes_are_squashed_to_resize_or_refused_in_one_line(tmp_path):
    root = cifar_like(tmp_path / "imgs", train=2, test=1)
    wide = np.random.default_rng(1).integers(0, 256, (5, 17, 3), dtype=np.uint8)
    Image.fromarray(wide).save(root / "train" / "cat" / "wide.png")
    out = tmp_path / "prepared"
    with pytest.raises(PipelineError) as err:
        prepare(PrepareParams(name="imagefolder", root=str(root)), out)
    assert str(err.value) == (f"image {root}/train/cat/wide.png is 17x5 but "
                              f"{root}/train/bird/000.png is 8x8; set dataset.resize to use "
                              "mixed sizes")
    assert not out.exists() and os.listdir(tmp_path) == ["imgs"]
    data = prepare(PrepareParams(name="imagefolder", root=str(root), resize=6), out)
    assert data.images.shape == (16, 6, 6, 3)
    row = list(data.paths).index("train/cat/wide.png")
    # Squashed, aspect ratio not kept: Pillow's bilinear resize of the whole image to 6x6.
    squashed = np.asarray(Image.fromarray(wide).resize((6, 6), Image.BILINEAR))
    np.testing.assert_array_equal(data.images[row], squashed)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_turns_the_header_size(tmp_path, fmt):
    root = tmp_path / "imgs"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 8 wide and 4 high, shown 4 wide and 8 high
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("L", (8, 4), 200).save(root / split / "a" / f"0{suffix}", exif=exif)
        Image.new("L", (4, 8), 100).save(root / split / "a" / f"1{suffix}")
    data = prepare(PrepareParams(name="imagefolder", root=str(root)), tmp_path / "prepared")
    assert data.images.shape == (4, 8, 4, 1)


def test_old_data_npz_beside_the_folder_is_named_not_deleted(tmp_path, capsys):
    old = tmp_path / "data.npz"
    old.write_bytes(b"old")
    prepare(PrepareParams(name="synthetic"), tmp_path / "prepared")
    assert capsys.readouterr().err.splitlines() == [
        f"prepare: {old} is the old single-file format; wrote {tmp_path / 'prepared'} "
        "(memory-mappable) instead; delete data.npz",
        "prepared 160 images (train 128, test 32), 4 classes, 16x16x1 uint8"]
    assert old.read_bytes() == b"old"


# ------------------------------------------------------------------------- bad input


def check_error(tmp_path, capsys, root, message):
    """prepare via the CLI prints exactly ``error: message`` and leaves nothing beside out."""
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "prepared"
    rc = main(["prepare", "--params", json.dumps({"name": "imagefolder", "root": str(root)}),
               "--out", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert list(out.parent.iterdir()) == []  # neither the folder nor its temporary one


def test_class_folders_inside_unlabeled_are_refused(tmp_path, capsys):
    root = unlabeled(cifar_like(tmp_path / "imgs", train=1, test=1), 1)
    (root / "unlabeled" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(root / "unlabeled" / "cat" / "0.png")
    check_error(tmp_path, capsys, root,
                f"imagefolder layout: '{root}/unlabeled/cat' is a folder; unlabeled/ holds "
                "images directly (label -1): put class folders in train/<class>/")
    archive = tar_gz(root, tmp_path / "imgs.tar.gz", "train", "test", "unlabeled")
    check_error(tmp_path, capsys, archive,
                f"imagefolder layout: 'unlabeled/cat/0.png' in '{archive}' lies in a folder "
                "under unlabeled/; unlabeled/ holds images directly (label -1): put class "
                "folders in train/<class>/")


def test_a_root_without_train_is_refused_naming_what_it_holds(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "notes.txt").write_text("no images here")
    check_error(tmp_path, capsys, root,
                f"imagefolder layout: missing folder '{root}/train'; expected "
                "<root>/train/<class>/*, optionally <root>/test/<class>/* and <root>/unlabeled/*")
    Image.new("RGB", (4, 4)).save(root / "a.jpg")
    check_error(tmp_path, capsys, root,
                f"imagefolder layout: '{root}' holds images (a.jpg, ...) but no train/ folder; "
                "expected <root>/train/<class>/*, optionally <root>/test/<class>/* and "
                "<root>/unlabeled/*")


def test_only_unlabeled_images_is_the_no_labelled_classes_error(tmp_path, capsys):
    root = unlabeled(tmp_path / "imgs", 3)
    (root / "train").mkdir()
    check_error(tmp_path, capsys, root,
                f"imagefolder layout: no images in '{root}/train'/<class>/")


def non_utf8(name: bytes) -> str:
    return os.fsdecode(name)  # Linux keeps the bad bytes as lone surrogates


@pytest.mark.parametrize("where", ["file", "class", "unlabeled"])
def test_names_that_are_not_utf8_are_named_with_ascii(tmp_path, capsys, where):
    root = unlabeled(cifar_like(tmp_path / "imgs", train=1, test=1), 1)
    if where == "file":
        bad = root / "train" / "cat" / non_utf8(b"caf\xe9.png")
    elif where == "class":
        (root / "train" / non_utf8(b"caf\xe9")).mkdir()
        bad = root / "train" / non_utf8(b"caf\xe9")
        Image.new("RGB", (8, 8)).save(bad / "0.png")
    else:
        bad = root / "unlabeled" / non_utf8(b"\xff.png")
    if where != "class":
        Image.new("RGB", (8, 8)).save(bad)
    check_error(tmp_path, capsys, root,
                f"imagefolder: the name {ascii(str(bad))} is not valid UTF-8; rename it")
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        for f in ("train", "test", "unlabeled"):
            tar.add(root / f, arcname=f)
    member = bad.relative_to(root).as_posix()
    check_error(tmp_path, capsys, archive,
                f"imagefolder: the name {ascii(f'{archive}/{member}')} is not valid UTF-8; "
                "rename it")


def test_a_bad_image_found_while_decoding_leaves_no_folder(tmp_path, capsys):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(np.array([[1, 2]], np.int32)).save(root / split / "a" / "0.tif")
    # Its header is fine; only its pixels, decoded after the writer started, are not.
    Image.fromarray(np.array([[-5, 70000]], np.int32)).save(root / "test" / "a" / "1.tif")
    check_error(tmp_path, capsys, root,
                f"unreadable image {root}/test/a/1.tif: Pillow mode 'I' (32-bit integer) "
                "with values in [-5, 70000], outside the 16-bit range [0, 65535]; save it as "
                "8-bit grey or RGB (or 16-bit grey)")


# --------------------------------------------------------------------- bounded memory


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_peak_memory_stays_below_the_images_size(tmp_path):
    # 6,400 RGB images of 128 x 128: 315 MB of pixels. Held in memory (as prepare did before
    # it wrote in chunks) they alone pass the bound; written a chunk at a time the process
    # stays well under it. The child reports its own peak, VmHWM: its ru_maxrss (and the
    # parent's RUSAGE_CHILDREN) start from the forking parent's size, pytest's here.
    per_class, side, bound = 1600, 128, 250 << 20
    assert 4 * per_class * side * side * 3 > bound
    script = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "from pipeline.prepare import PrepareParams, SyntheticParams, prepare\n"
        f"s = SyntheticParams(classes=4, per_class={per_class}, size={side}, channels=3)\n"
        "prepare(PrepareParams(name='synthetic', synthetic=s), sys.argv[1])\n"
        "status = Path('/proc/self/status').read_text()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status)[1]) * 1024, 'torch' in sys.modules)\n")
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                          text=True, timeout=300, check=True)
    peak, torch = proc.stdout.split()
    assert int(peak) < bound, f"peak RSS {int(peak) >> 20} MiB"
    assert torch == "False"  # its import alone would cost more than the bound allows
    assert load_prepared(out).images.shape == (6400, side, side, 3)


def test_decoded_chunks_of_an_archive_are_written_in_place(tmp_path):
    """More images than one chunk, in an archive whose order is not the rows' order."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(3)
    for split, n in (("train", 700), ("test", 400)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, "PNG")
                (root / split / c / f"{j:04d}.png").write_bytes(buf.getvalue())
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        for f in sorted((root).rglob("*.png"), key=lambda f: f.name, reverse=True):
            tar.add(f, arcname=f.relative_to(root).as_posix())
    a = prepare(PrepareParams(name="imagefolder", root=str(root)), tmp_path / "a")
    b = prepare(PrepareParams(name="imagefolder", root=str(archive)), tmp_path / "b")
    same_set(b, a.images, a.labels, a.split, a.ids)
    np.testing.assert_array_equal(b.paths, a.paths)


def test_tar_links_lead_through_chains_to_files_outside_the_layout(tmp_path):
    root = cifar_like(tmp_path / "imgs", train=1, test=1)
    blob = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (root / "blobs").mkdir()
    Image.fromarray(blob).save(root / "blobs" / "x.bin", format="PNG")  # no image suffix
    (root / "train" / "cat" / "link.png").symlink_to("../../blobs/x.bin")
    (root / "train" / "cat" / "chain.png").symlink_to("link.png")
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")  # members named ./train/cat/..., as tar -C imgs . names them
    a = prepare(PrepareParams(name="imagefolder", root=str(root)), tmp_path / "a")
    b = prepare(PrepareParams(name="imagefolder", root=str(archive)), tmp_path / "b")
    same_set(b, a.images, a.labels, a.split, a.ids)
    assert list(b.paths) == [f"./{p}" for p in a.paths]
    for name in ("./train/cat/chain.png", "./train/cat/link.png"):
        np.testing.assert_array_equal(b.images[list(b.paths).index(name)], blob)


def test_hidden_members_of_an_archive_are_skipped_as_hidden_files_of_a_folder(tmp_path):
    """macOS tar adds '._name' resource forks beside every file: not images."""
    import io
    import tarfile

    from PIL import Image

    from pipeline.io import load_prepared
    from pipeline.prepare import PrepareParams, prepare

    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    archive = tmp_path / "set.tar"
    with tarfile.open(archive, "w") as tar:
        for name, raw in [("train/a/1.png", png(10)), ("train/a/._1.png", b"\0\5\26\7junk"),
                          ("train/b/2.png", png(200)), ("test/a/3.png", png(20))]:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    prepare(PrepareParams(name="imagefolder", root=str(archive)), tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    assert sorted(data.paths) == ["test/a/3.png", "train/a/1.png", "train/b/2.png"]
