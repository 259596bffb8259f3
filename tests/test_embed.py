"""Embed stage: an encoder's features in the latents schema, equal to what evaluation computes;
the embed-images command: files of a folder or archive to Parquet, chunk by chunk."""

import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.embed import embed_images, read_embeddings
from pipeline.io import load_prepared, read_latents
from pipeline.train.encoder import encode_checkpoint, encode_images


def test_features_parquet_matches_the_evaluated_features(tmp_path, encoder):
    enc, data = encoder
    out = tmp_path / "features.parquet"
    assert main(["embed", "--run", "untrained", "--dataset", "syn", "--device", "cpu",
                 "--encoder", str(enc), "--data", str(data), "--out", str(out)]) == 0
    ids, feats, meta = read_latents(out)
    prepared = load_prepared(data)
    expected, _ = encode_checkpoint(enc, prepared, "cpu")
    np.testing.assert_array_equal(ids, prepared.ids)
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    assert meta["model"] == "untrained" and meta["dimension"] == str(expected.shape[1])
    assert meta["dataset"] == "syn"


def test_embed_images_from_an_array_and_a_folder(tmp_path, encoder):
    enc, data = encoder
    images = load_prepared(data).images[:5]
    paths, from_array = embed_images(enc, images, "cpu")
    assert paths is None and from_array.shape == (5, 512) and from_array.dtype == np.float32
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    from_folder = embed_images(enc, tmp_path / "mine", "cpu")
    assert from_folder.paths == [f"sub/{i}.png" for i in range(5)]
    np.testing.assert_allclose(from_folder.features, from_array, rtol=1e-5, atol=1e-5)
    with pytest.raises(PipelineError, match=r"trained on 12 px images with 3 channels; "
                                            r"the data has 8 px, 3 channels"):
        embed_images(enc, np.zeros((2, 8, 8, 3), np.uint8), "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match=r"empty: no image files"):
        embed_images(enc, empty, "cpu")


def _mixed_folder(root):
    """Files of every kind prepare converts, at mixed sizes; returns {path: expected pixels}
    (uint8 12x12x3, built here by the rules, independently of the reader)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rgb[..., 0]).save(root / "grey.png")
    Image.fromarray(rgb).save(root / "sub" / "photo.jpg", quality=95)
    Image.fromarray(np.dstack([rgb[:12, :12], rgb[:12, :12, :1]])).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)).save(
        root / "sub" / "grey16.png")
    Image.fromarray(rgb).convert("P").save(root / "sub" / "deeper" / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show upright
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif, quality=95)
    os.link(root / "grey.png", root / "sub" / "hard.png")  # a tar stores it as a hard link
    os.symlink("../rotated.jpg", root / "sub" / "soft.jpg")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(rgb).save(root / ".hidden.png")  # skipped, as prepare skips it

    expected = {}
    for f in sorted(root.rglob("*")):
        name = f.relative_to(root).as_posix()
        if f.suffix not in (".png", ".jpg", ".gif") or name.startswith("."):
            continue
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):
                im = Image.fromarray((np.asarray(im) // 257).astype(np.uint8))
            im = im.convert("L" if im.mode == "L" else "RGB").resize((12, 12), Image.BILINEAR)
            expected[name] = np.asarray(im.convert("RGB"))
    with Image.open(root / "rotated.jpg") as im:
        assert ImageOps.exif_transpose(im).size == (30, 20)  # the reference did rotate it
    return expected


def _embed_cli(enc, images, out, *extra):
    return main(["embed-images", "--encoder", str(enc), "--images", str(images),
                 "--out", str(out), "--device", "cpu", *extra])


def test_embed_images_command_writes_one_row_per_file_in_chunks(tmp_path, encoder, capsys):
    enc, _ = encoder
    folder = tmp_path / "mine"
    expected = _mixed_folder(folder)
    out = tmp_path / "out" / "embeddings.parquet"
    assert _embed_cli(enc, folder, out, "--chunk", "3", "--batch-size", "2") == 0

    (paths, feats), meta = read_embeddings(out)
    assert paths == sorted(expected) and len(paths) == 8
    direct, _ = encode_images(enc, np.stack([expected[p] for p in paths]), "cpu")
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
    in_python = embed_images(enc, folder, "cpu")
    assert in_python.paths == paths
    np.testing.assert_allclose(in_python.features, feats, rtol=1e-5, atol=1e-5)

    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # one per chunk of 3
    feature = pq.read_schema(out).field("feature").type
    assert pa.types.is_fixed_size_list(feature) and feature.list_size == 512
    assert feature.value_type == pa.float32()
    assert meta["encoder"] == str(enc) and meta["dimension"] == "512"
    assert meta["image_size"] == "12" and meta["channels"] == "3" and meta["images"] == "8"
    err = capsys.readouterr().err
    assert "embedded 3/8 images (" in err and "embedded 8/8 images (" in err
    assert "embedded 8 images into 512-d features in " in err
    assert sorted(os.listdir(out.parent)) == ["embeddings.parquet"]  # no temporary left


def test_embed_images_command_reads_a_tar_gz_like_the_folder(tmp_path, encoder):
    enc, _ = encoder
    folder = tmp_path / "mine"
    _mixed_folder(folder)
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")  # members './sub/photo.jpg': read as 'sub/photo.jpg'
    assert _embed_cli(enc, folder, tmp_path / "folder.parquet") == 0
    assert _embed_cli(enc, archive, tmp_path / "tar.parquet", "--chunk", "4") == 0
    (paths, feats), _ = read_embeddings(tmp_path / "folder.parquet")
    (tar_paths, tar_feats), meta = read_embeddings(tmp_path / "tar.parquet")
    with tarfile.open(archive) as tar:
        links = {m.name: m.type for m in tar if m.islnk() or m.issym()}
    assert links == {"./sub/hard.png": tarfile.LNKTYPE, "./sub/soft.jpg": tarfile.SYMTYPE}
    assert sorted(tar_paths) == paths and tar_paths[-2:] == ["sub/hard.png", "sub/soft.jpg"]
    by_path = dict(zip(tar_paths, tar_feats, strict=True))
    np.testing.assert_allclose(np.stack([by_path[p] for p in paths]), feats,
                               rtol=1e-5, atol=1e-5)
    assert meta["source"] == str(archive)


def _no_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "readme.txt").write_text("x")
    return tmp_path / "imgs", r"imgs: no image files \(.bmp, .gif, "


def _unreadable(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):  # the bad file comes in the second chunk, after a written row group
        Image.new("RGB", (12, 12), (i, 0, 0)).save(folder / f"{i}.png")
    (folder / "3_bad.png").write_bytes(b"not a png")
    return folder, r"unreadable image .*imgs/3_bad\.png: not a format Pillow can read \(9 bytes\)"


def _not_utf8(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (12, 12)).save(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    return folder, r"image path '.*imgs/caf\\udce9\.png' is not valid UTF-8; rename it"


def _damaged_archive(tmp_path):
    folder, _ = _unreadable(tmp_path)
    (folder / "3_bad.png").unlink()
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="imgs")
    archive.write_bytes(archive.read_bytes()[:-30])  # cut: the gzip end is missing
    return archive, r"imgs\.tar\.gz: damaged archive \("


def _cut_archive(tmp_path):
    folder, _ = _unreadable(tmp_path)
    (folder / "3_bad.png").unlink()
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="imgs")
    with tarfile.open(archive) as tar:
        second = [m for m in tar if m.isfile()][1].offset
    # Cut at a member's header: tarfile alone would end the archive there, quietly.
    archive.write_bytes(archive.read_bytes()[:second])
    return archive, r"imgs\.tar: damaged archive \(ReadError: the archive ends without its end " \
                    r"marker"


def _dangling_link_in_archive(tmp_path):
    folder, _ = _unreadable(tmp_path)
    (folder / "3_bad.png").unlink()
    os.symlink("gone.png", folder / "link.png")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="imgs")
    return archive, r"unreadable image .*imgs\.tar\.gz:imgs/link\.png: link to 'imgs/gone\.png'"


def _no_encoder(tmp_path):
    folder, _ = _unreadable(tmp_path)
    return folder, r"encoder checkpoint not found: .*missing\.pt"


@pytest.mark.parametrize("case", [_no_images, _unreadable, _not_utf8, _damaged_archive,
                                  _cut_archive, _dangling_link_in_archive, _no_encoder])
def test_embed_images_command_bad_input_is_one_line_and_no_file(tmp_path, encoder, capsys,
                                                                case):
    import re

    enc, _ = encoder
    images, message = case(tmp_path)
    if case is _no_encoder:
        enc = tmp_path / "missing.pt"
    out = tmp_path / "out" / "embeddings.parquet"
    assert _embed_cli(enc, images, out, "--chunk", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(message, err[-1]), err
    assert not any(line.startswith(("Traceback", "  File")) for line in err)
    assert not out.parent.exists() or os.listdir(out.parent) == []
