"""Embed stage: an encoder's features in the latents schema, equal to what evaluation computes."""

import numpy as np
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.embed import embed_images
from pipeline.io import load_prepared, read_latents
from pipeline.prepare import PrepareParams, SyntheticParams, prepare
from pipeline.train.encoder import encode_checkpoint, write_untrained


@pytest.fixture
def encoder(tmp_path, one_thread):
    data = tmp_path / "prepared"
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=8, size=12, channels=3)), data)
    out = tmp_path / "encoder.pt"
    write_untrained("smallconv", 0, data, out)
    return out, data


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
    from_array = embed_images(enc, images, "cpu")
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    from_folder = embed_images(enc, tmp_path / "mine", "cpu")
    np.testing.assert_allclose(from_folder, from_array, rtol=1e-5, atol=1e-5)
    with pytest.raises(PipelineError, match=r"trained on 12 px images with 3 channels; "
                                            r"the data has 8 px, 3 channels"):
        embed_images(enc, np.zeros((2, 8, 8, 3), np.uint8), "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match=r"empty: no image files"):
        embed_images(enc, empty, "cpu")
