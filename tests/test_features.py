"""Shared feature readers: id alignment and raw-pixel vectors, against hand-made answers."""

import numpy as np
import pytest
from conftest import CountingImages

from pipeline import PipelineError
from pipeline.features import PixelMatrix, align, blocks, gather, pixel_features, select
from pipeline.io import Prepared


def test_align_finds_shuffled_ids_in_the_callers_order():
    wanted = np.array([10, 11, 12, 13, 14], dtype=np.int64)
    table = np.random.default_rng(0).permutation(wanted)
    pos = align(table, wanted, "prepared", "t.parquet")
    np.testing.assert_array_equal(table[pos], wanted)
    # a subset of the table's ids, the rest allowed through ``known``
    pos = align(table, wanted[[3, 1]], "training", "t.parquet", known=wanted)
    np.testing.assert_array_equal(table[pos], [13, 11])


def test_align_names_missing_unknown_and_duplicated_ids():
    wanted = np.arange(5, dtype=np.int64)
    with pytest.raises(PipelineError) as e:
        align(np.array([0, 1, 2, 4]), wanted, "training", "t.parquet")
    assert str(e.value) == ("t.parquet: ids do not match the prepared data set (1 training ids "
                            "missing, 0 ids unknown, 0 duplicated)")
    with pytest.raises(PipelineError) as e:
        align(np.array([0, 1, 2, 3, 4, 9, 9]), wanted, "training", "t.parquet")
    assert str(e.value) == ("t.parquet: ids do not match the prepared data set (0 training ids "
                            "missing, 1 ids unknown, 1 duplicated)")
    with pytest.raises(PipelineError, match=r"\(0 training ids missing, 1 ids unknown"):
        align(np.array([0, 1, 7]), wanted[:2], "training", "t.parquet", known=wanted)
    with pytest.raises(PipelineError, match=r"\(2 prepared ids missing, 0 ids unknown, 0 dup"):
        align(np.array([], dtype=np.int64), wanted[:2], "prepared", "t.parquet")


def test_pixel_features_flatten_and_scale_to_unit_float32():
    images = np.array([[[[0, 255], [51, 102]]], [[[255, 0], [204, 153]]]], dtype=np.uint8)
    data = Prepared(images, np.array([0, 1]), np.array(["train", "test"]),
                    np.array([7, 8]), ["a", "b"])  # (2, 1, 2, 2): 1x2 pixels, 2 channels
    x = pixel_features(data)
    assert x.shape == (2, 4) and x.dtype == np.float32
    expected = np.array([[0, 1, 0.2, 0.4], [1, 0, 0.8, 0.6]], np.float32)
    np.testing.assert_array_equal(x[:], expected)
    np.testing.assert_array_equal(x[1], expected[1])
    np.testing.assert_array_equal(pixel_features(data, np.array([1]))[:], expected[1:])


def test_pixel_matrix_reads_only_the_rows_asked_a_chunk_at_a_time():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 3, 2), dtype=np.uint8)
    dense = images.reshape(50, -1).astype(np.float32) / 255
    counting = CountingImages(images)
    x = PixelMatrix(counting)
    rows = np.flatnonzero(rng.random(50) < 0.5)
    part = select(x, rows)
    assert counting.reads == [] and part.shape == (len(rows), 18)  # nothing read yet
    np.testing.assert_array_equal(gather(part, chunk=4), dense[rows])
    assert max(counting.reads) == 4
    np.testing.assert_array_equal(gather(part, np.array([3, 0]), chunk=1), dense[rows[[3, 0]]])
    starts = [s for s, _ in blocks(part, 6)]
    assert starts == list(range(0, len(rows), 6))
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks(part, 6)]), dense[rows])
    # A view of a view reads the base rows directly; in-memory features pass through.
    np.testing.assert_array_equal(select(part, slice(2, 5))[:], dense[rows[2:5]])
    np.testing.assert_array_equal(select(dense, rows), dense[rows])
