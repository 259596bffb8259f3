"""Neighbours stage: FAISS self-kNN against a brute-force reference, purity, hubness, files."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CountingImages

from pipeline import PipelineError
from pipeline.io import Prepared, load_neighbours, save_prepared
from pipeline.neighbours import (
    NeighboursParams,
    find_neighbours,
    hubness,
    knn,
    purity,
    purity_table,
    quality_gate,
)

HAS_GPU = torch.cuda.is_available() and faiss.get_num_gpus() > 0


def reference(x: np.ndarray, metric: str) -> np.ndarray:
    """All pairwise distances in float64, self set to +inf: (N, N)."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - x @ x.T
    else:
        sq = (x**2).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    np.fill_diagonal(dist, np.inf)
    return dist


def assert_matches_reference(D, I, x, metric, k, atol=1e-4):  # noqa: E741
    """Tie-tolerant: the distances are the k smallest, and each id sits at its distance."""
    ref = reference(x, metric)
    n = len(x)
    assert D.shape == I.shape == (n, k)
    assert D.dtype == np.float32 and I.dtype == np.int64
    rows = np.arange(n)[:, None]
    assert not (I == rows).any(), "self appears among its own neighbours"
    assert all(len(set(r)) == k for r in I.tolist()), "an id repeats within a row"
    np.testing.assert_allclose(D, np.sort(ref, axis=1)[:, :k], atol=atol)
    np.testing.assert_allclose(D, ref[rows, I], atol=atol)
    assert (np.diff(D, axis=1) >= -atol).all(), "not nearest first"


def clustered(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d)) * 3
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_knn_equals_brute_force(metric, index):
    x = clustered()
    # IVF with nprobe = nlist visits every cell, so it must be exact too. chunk_size 64 makes
    # the last chunk partial.
    D, I = knn(x, 7, metric, index=index, nlist=4, nprobe=4, chunk_size=64)  # noqa: E741
    assert_matches_reference(D, I, x, metric, 7)


def test_knn_returns_ids_when_given():
    x = clustered(n=50)
    ids = np.arange(50, dtype=np.int64) * 10 + 3
    D, I_pos = knn(x, 3, "euclidean")
    D2, I_ids = knn(x, 3, "euclidean", ids=ids)
    np.testing.assert_array_equal(I_ids, ids[I_pos])
    np.testing.assert_array_equal(D, D2)


def test_ivf_fills_short_lists_by_visiting_every_cell():
    # 200 points clamp nlist to 5 cells of ~40 points; with nprobe=1 some queries' cells hold
    # fewer than k+1 = 51 points, so FAISS pads with -1 and the search must widen.
    x = clustered(n=200, d=4)
    D, I = knn(x, 50, "euclidean", index="ivf", nlist=1024, nprobe=1)  # noqa: E741
    assert (I >= 0).all()
    assert not (I == np.arange(200)[:, None]).any()
    assert all(len(set(r)) == 50 for r in I.tolist())
    assert np.isfinite(D).all()


def test_duplicates_are_each_others_nearest_and_self_is_absent():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32) * 10
    x[3] = x[17]
    D, I = knn(x, 1, "euclidean")  # noqa: E741
    assert I[3, 0] == 17 and I[17, 0] == 3
    assert D[3, 0] == 0.0  # computed as |a - b|, not |a|^2 + |b|^2 - 2ab
    # Five copies of one vector, k=3: every list holds three other copies, never self.
    x[20:25] = x[0]
    for metric in ("euclidean", "cosine"):
        D, I = knn(x, 3, metric)  # noqa: E741
        for row in [0, *range(20, 25)]:
            assert row not in I[row]
            assert set(I[row]) <= {0, 20, 21, 22, 23, 24}
            np.testing.assert_allclose(D[row], 0, atol=1e-6)


def test_knn_rejects_bad_input():
    x = clustered(n=10)
    with pytest.raises(PipelineError, match=r"^unknown metric 'manhattan'; use one of: cosine, "
                       r"euclidean$"):
        knn(x, 2, "manhattan")
    with pytest.raises(PipelineError, match=r"^k = 10 must be at least 1 and less than the "
                       r"number of rows \(10\)$"):
        knn(x, 10, "euclidean")
    x[4, 1] = np.nan
    with pytest.raises(PipelineError, match=r"^x: 1 of 10 rows contain NaN or infinite values$"):
        knn(x, 2, "euclidean")


def test_purity_by_hand():
    labels = np.array([0, 0, 1, -1])
    neighbour_labels = np.array([[0, -1], [1, 1], [1, 0], [0, 0]])
    # Anchor 3 is unlabelled; the pair (0, -1) is unknown. At 1: 0 same, 1 differs, 2 same.
    # Over k: 5 known pairs, 2 agree.
    p1, pk = purity(labels, neighbour_labels)
    assert p1 == pytest.approx(2 / 3)
    assert pk == pytest.approx(2 / 5)
    assert np.isnan(purity(np.array([-1]), np.array([[0]]))[0])


def test_hubness_by_hand():
    index = np.array([[1, 2], [0, 2], [0, 1], [2, 1]])
    # In-degrees: 0 -> 2, 1 -> 3, 2 -> 3, 3 -> 0.
    assert hubness(index, 4) == (3, 0.25)


# --- end to end ---------------------------------------------------------------------------

CLASSES = ["bars", "dots", "ring"]


@pytest.fixture
def prepared(tmp_path):
    """30 train, 9 test, 3 unlabelled images of 3 classes; ids deliberately not 0..N-1.

    Unlabelled images are training data too (BYOL learns from them): 33 anchors.
    """
    rng = np.random.default_rng(0)
    n = 42
    labels = np.arange(n) % 3
    images = (rng.random((n, 6, 6, 1)) * 60 + labels[:, None, None, None] * 90).astype(np.uint8)
    split = np.array(["train"] * 30 + ["test"] * 9 + ["unlabeled"] * 3)
    labels = np.where(split == "unlabeled", -1, labels).astype(np.int64)
    ids = (np.arange(n, dtype=np.int64) * 7 + 100)[rng.permutation(n)]
    data = Prepared(images, labels, split, ids, CLASSES)
    save_prepared(tmp_path / "prepared", data)
    return data, tmp_path / "prepared"


def write_latents(path, data: Prepared, *, drop=(), nan_rows=()):
    """A latent export as the latent stage writes it, rows shuffled: 3-d, one axis per class."""
    rng = np.random.default_rng(1)
    latent = np.eye(3, dtype=np.float32)[np.maximum(data.labels, 0)] * 5
    latent += rng.normal(size=latent.shape).astype(np.float32) * 0.3
    latent[list(nan_rows)] = np.nan
    order = np.setdiff1d(rng.permutation(len(data.ids)), drop, assume_unique=True)
    table = pa.table({
        "id": pa.array(data.ids[order], pa.int64()),
        "split": pa.array(data.split[order]),
        "label": pa.array(data.labels[order], pa.int64()),
        "latent": pa.FixedSizeListArray.from_arrays(pa.array(latent[order].ravel()), 3),
    }).replace_schema_metadata({b"model": b"ae", b"dimension": b"3", b"dataset": b"tiny"})
    pq.write_table(table, path)
    return latent


META_KEYS = {"metric", "distance", "k", "backend", "index", "space", "dataset", "purity_at_1",
             "purity_at_k", "hub_max_in_degree", "hub_orphan_fraction", "n", "code_version",
             "seconds"}


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_find_neighbours_on_latents(tmp_path, prepared, metric):
    data, npz = prepared
    latent = write_latents(tmp_path / "latents.parquet", data)
    out, grid = tmp_path / "nb" / "neighbours.parquet", tmp_path / "nb" / "grid.png"
    find_neighbours(NeighboursParams(k=4), tmp_path / "latents.parquet", npz, metric, out, grid,
                    "cpu")

    schema = pq.read_schema(out)
    assert schema.field("id").type == pa.int64()
    assert schema.field("neighbours").type == pa.list_(pa.int64(), 4)
    assert schema.field("distances").type == pa.list_(pa.float32(), 4)
    ids, nb, dist, meta = load_neighbours(out)
    assert META_KEYS <= set(meta)
    train = np.isin(data.split, ("train", "unlabeled"))
    np.testing.assert_array_equal(ids, data.ids[train])
    assert nb.shape == dist.shape == (33, 4)
    assert meta["metric"] == metric and meta["k"] == "4" and meta["space"] == "ae"
    assert meta["backend"] == "faiss-cpu-flat" and meta["dataset"] == "tiny"
    assert meta["distance"] == {"euclidean": "l2", "cosine": "cosine"}[metric]
    assert meta["n"] == "33"
    # Three well-separated clusters of 10: every neighbour shares the anchor's label.
    assert float(meta["purity_at_1"]) == 1.0 and float(meta["purity_at_k"]) == 1.0
    # Neighbours are training ids, never self, at the reference distances.
    pos = {i: p for p, i in enumerate(ids)}
    nb_pos = np.vectorize(pos.get)(nb)
    assert_matches_reference(dist, nb_pos, latent[train], metric, 4)
    in_deg = np.bincount(nb_pos.ravel(), minlength=33)
    assert int(meta["hub_max_in_degree"]) == in_deg.max()
    assert float(meta["hub_orphan_fraction"]) == pytest.approx((in_deg == 0).mean())
    assert grid.stat().st_size > 1000


def test_find_neighbours_on_pixels(tmp_path, prepared):
    data, npz = prepared
    out = tmp_path / "neighbours.parquet"
    find_neighbours(NeighboursParams(k=3, index="ivf", nlist=64, nprobe=64), npz, npz, "cosine",
                    out, tmp_path / "grid.png", "auto")
    ids, nb, dist, meta = load_neighbours(out)
    assert len(ids) == 33 and meta["space"] == "pixels" and meta["index"] == "ivf"
    assert meta["backend"] in ("faiss-cpu-ivf", "faiss-gpu-ivf")
    assert meta["nlist"] == "1"  # 33 training images clamp nlist to max(1, 33 // 39)
    train = np.isin(data.split, ("train", "unlabeled"))
    x = data.images[train].reshape(33, -1).astype(np.float32) / 255
    pos = {i: p for p, i in enumerate(ids)}
    assert_matches_reference(dist, np.vectorize(pos.get)(nb), x, "cosine", 3)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_pixel_neighbours_read_in_chunks_equal_the_in_memory_search(tmp_path, prepared,
                                                                     monkeypatch, metric, index):
    """Raw pixels are read chunk_size rows at a time (candidates of a chunk for the exact
    euclidean distances), never copied whole, and give the neighbours of the float array."""
    import pipeline.neighbours.spaces as spaces
    from pipeline.io import load_prepared

    data, npz = prepared
    counted = []

    def counting_load(path):
        loaded = load_prepared(path)
        loaded.images = CountingImages(loaded.images)
        counted.append(loaded.images)
        return loaded

    monkeypatch.setattr(spaces, "load_prepared", counting_load)
    out = tmp_path / "neighbours.parquet"
    params = NeighboursParams(k=3, index=index, nlist=4, nprobe=1, chunk_size=5)
    find_neighbours(params, npz, npz, metric, out, tmp_path / "grid.png", "cpu")
    ids, nb, dist, _ = load_neighbours(out)
    assert max(counted[0].reads) <= 5 * (params.k + 1)
    train = np.isin(data.split, ("train", "unlabeled"))
    x = data.images[train].reshape(int(train.sum()), -1).astype(np.float32) / 255
    D, I = knn(x, 3, metric, ids=data.ids[train], index=index, nlist=4, nprobe=1,  # noqa: E741
               chunk_size=5)
    np.testing.assert_array_equal(nb, I)
    np.testing.assert_array_equal(dist, D)


def test_a_search_that_cannot_fit_fails_in_one_line_naming_the_key(tmp_path, prepared,
                                                                   monkeypatch):
    import pipeline.neighbours as neighbours

    data, npz = prepared
    write_latents(tmp_path / "latents.parquet", data)
    monkeypatch.setattr(neighbours, "available_memory", lambda gpu=None: 100)
    # 33 training images of 6x6x1 pixels: the index holds 33 x 36 float32 = 4752 bytes.
    with pytest.raises(PipelineError) as e:
        find_neighbours(NeighboursParams(k=3), npz, npz, "euclidean", tmp_path / "n.parquet",
                        tmp_path / "g.png", "cpu")
    assert str(e.value) == (
        "neighbours in the pixels space need 0.0 GiB for the FAISS index (a float32 copy of 33 "
        "training vectors of dimension 36), more than the 0.0 GiB of host memory available; "
        "set neighbours.pixels: false to skip raw-pixel neighbours")
    with pytest.raises(PipelineError, match=r"^neighbours in the ae space need .* of 33 "
                       r"training vectors of dimension 3\), .*; lower latent.dim, or drop ae "
                       r"from latent.models$"):
        find_neighbours(NeighboursParams(k=3), tmp_path / "latents.parquet", npz, "cosine",
                        tmp_path / "n.parquet", tmp_path / "g.png", "cpu")
    assert not (tmp_path / "n.parquet").exists()
    from pipeline.neighbours import index_bytes

    # Pixels of 1M 32x32x3 images: 12.3 GB of float32 in a flat index, nothing besides.
    assert index_bytes(10**6, 3072, lazy=True) == 12_288_000_000
    assert index_bytes(10**6, 64) == 2 * 4 * 64 * 10**6  # an array in memory: prepared copy


def test_cli_and_purity_table(tmp_path, prepared):
    from pipeline.__main__ import main

    data, npz = prepared
    write_latents(tmp_path / "latents.parquet", data)
    outs = []
    for source, metric in ((npz, "euclidean"), (tmp_path / "latents.parquet", "cosine")):
        out = tmp_path / f"{source.stem}-{metric}" / "neighbours.parquet"
        assert main(["--threads", "1", "neighbours", "--metric", metric, "--params", '{"k": 2}',
                     "--device", "cpu", "--source", str(source), "--data", str(npz),
                     "--out", str(out), "--grid", str(out.with_name("grid.png"))]) == 0
        outs.append(out)
    csv = tmp_path / "purity.csv"
    purity_table(outs, csv)
    df = pd.read_csv(csv)
    assert list(df.columns) == ["space", "metric", "k", "purity_at_1", "purity_at_k",
                                "hub_max_in_degree", "hub_orphan_fraction", "backend", "seconds",
                                "pixels_purity_at_1", "purity_gap_at_1", "recon_ratio",
                                "latent_spread", "latent_collapsed", "flagged", "flag_reason"]
    assert not df["flagged"].any()  # different metrics: no pixel reference for the latent
    assert list(df["space"]) == ["ae", "pixels"]  # sorted
    assert list(df["metric"]) == ["cosine", "euclidean"]
    assert (df["k"] == 2).all()
    meta = load_neighbours(outs[0])[3]
    assert df.loc[1, "purity_at_k"] == pytest.approx(float(meta["purity_at_k"]))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_neighbours_and_purity_stages_never_import_torch_off_the_gpu(tmp_path, prepared, device):
    """The stages need only FAISS: importing torch (~2 s) took 20 times the search of a small
    set. ``auto`` may import it only where this faiss build sees a GPU to search on."""
    import json
    import subprocess
    import sys

    if device == "auto" and faiss.get_num_gpus() > 0:
        pytest.skip("this faiss build sees a GPU: auto resolves it with torch")
    data, npz = prepared
    write_latents(tmp_path / "latents.parquet", data)
    out = tmp_path / "nb" / "neighbours.parquet"
    argv = ["--threads", "1", "neighbours", "--metric", "cosine", "--params", '{"k": 2}',
            "--device", device, "--source", str(tmp_path / "latents.parquet"), "--data",
            str(npz), "--out", str(out), "--grid", str(out.with_name("grid.png"))]
    code = ("import json, sys; from pipeline.__main__ import main; "
            f"rc = main({argv!r}); "
            f"rc = rc or main(['purity', '--out', {str(tmp_path / 'purity.csv')!r}, "
            f"{str(out)!r}]); "
            "print(json.dumps([rc, 'torch' in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [0, False], run.stdout
    assert out.exists() and (tmp_path / "purity.csv").exists()


def test_search_device_resolves_a_gpu_only_where_faiss_can_search_on_one(monkeypatch, capsys):
    """cpu, and auto with a faiss build that sees no GPU, search on the CPU without asking
    torch (a note where the host has GPUs); else the device is resolved and used if FAISS can."""
    import pipeline.device
    import pipeline.threads
    from pipeline.neighbours.search import GPU_MAX_K, search_device

    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        search_device("tpu", 5)
    resolved = []

    def resolve(name):
        resolved.append(name)
        return torch.device("cuda", 1)

    monkeypatch.setattr(pipeline.device, "resolve_device", resolve)
    monkeypatch.setattr(pipeline.threads, "host_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert search_device("cpu", 5) is None and search_device("auto", 5) is None
    assert resolved == []
    assert capsys.readouterr().err == ("CUDA is present but this faiss build has no GPU support; "
                                       "searching on CPU\n")
    assert search_device("cuda", 5) is None and resolved == ["cuda"]  # asked for: resolved
    assert "no GPU support" in capsys.readouterr().err
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert search_device("auto", 5) == torch.device("cuda", 1)
    assert search_device("auto", GPU_MAX_K) is None  # k + 1 beyond FAISS's GPU k-selection
    assert capsys.readouterr().err == ""


def test_image_grid_tiles_ragged_rows_of_mixed_images(tmp_path):
    """One picture from rows of different lengths, grey uint8 beside RGB floats (out of range
    values clipped): each image in its cell, the empty cells white."""
    from PIL import Image

    from pipeline.plots import image_grid

    grey = np.full((3, 8, 8, 1), 40, np.uint8)
    red = np.zeros((2, 8, 8, 3), np.float32)
    red[..., 0] = 1.5  # clipped to 1
    path = tmp_path / "grid.png"
    image_grid([grey, red], path, row_labels=["grey", "red\nsecond line"], title="t",
               col_labels=["a", "b", "c"], cell_labels=[["", "x", ""], ["", "y"]])
    png = np.asarray(Image.open(path).convert("RGB"))
    colours = {tuple(c) for c in png.reshape(-1, 3)}
    assert (40, 40, 40) in colours and (255, 0, 0) in colours and (255, 255, 255) in colours
    # Two rows of cells about 1.1 inches apart at 110 dpi, three columns wide.
    assert 2 * 110 < png.shape[0] and 3 * 110 < png.shape[1]


def test_errors_name_the_problem(tmp_path, prepared):
    data, npz = prepared
    src = tmp_path / "latents.parquet"
    out, grid = tmp_path / "neighbours.parquet", tmp_path / "grid.png"
    write_latents(src, data)

    def run(source=src, metric="euclidean", k=3):
        find_neighbours(NeighboursParams(k=k), source, npz, metric, out, grid, "cpu")

    with pytest.raises(PipelineError) as e:
        run(k=33)
    assert str(e.value) == (f"neighbours.k = 33 must be less than the number of training images "
                            f"(33) in {npz}")
    with pytest.raises(PipelineError) as e:
        run(metric="manhattan")
    assert str(e.value) == "unknown metric 'manhattan'; use one of: cosine, euclidean"

    write_latents(src, data, nan_rows=(2, 5))
    with pytest.raises(PipelineError) as e:
        run()
    assert str(e.value) == f"{src}: 2 of 42 latent rows contain NaN or infinite values"

    write_latents(src, data, drop=[0, 4, 35])  # two training rows and one test row
    with pytest.raises(PipelineError) as e:
        run()
    assert str(e.value) == (f"{src}: ids do not match the prepared data set (2 training ids "
                            "missing, 0 ids unknown, 0 duplicated)")
    assert not out.exists() and not grid.exists()


def test_ids_unknown_to_the_data_set(tmp_path, prepared):
    data, npz = prepared
    src = tmp_path / "latents.parquet"
    write_latents(src, data)
    table = pq.read_table(src)
    ids = table.column("id").to_numpy().copy()
    ids[0] = 999_999
    table = table.set_column(0, "id", pa.array(ids, pa.int64()))
    pq.write_table(table, src)
    with pytest.raises(PipelineError, match=r"ids do not match the prepared data set \(\d "
                       r"training ids missing, 1 ids unknown, 0 duplicated\)$"):
        find_neighbours(NeighboursParams(k=3), src, npz, "cosine", tmp_path / "n.parquet",
                        tmp_path / "g.png", "cpu")


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU with faiss-gpu")
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_gpu_agrees_with_cpu(metric, index):
    x = clustered(n=5000, d=32)
    D_cpu, I_cpu = knn(x, 10, metric, index=index, nlist=16, nprobe=16, chunk_size=1024)
    D_gpu, I_gpu = knn(x, 10, metric, index=index, nlist=16, nprobe=16, chunk_size=1024,
                       use_gpu=True)
    np.testing.assert_allclose(D_gpu, D_cpu, atol=1e-3)
    # Ids may swap among equal distances; otherwise they agree.
    assert (I_gpu == I_cpu).mean() > 0.99
    assert_matches_reference(D_gpu, I_gpu, x, metric, 10, atol=1e-3)


def test_knn_high_dimension_refines_in_blocks():
    # 200 x 20000 (raw-pixel-like width): the exact-distance pass runs in several blocks.
    x = np.random.default_rng(3).random((200, 20_000), dtype=np.float32)
    x[7] = x[150]
    D, I = knn(x, 3, "euclidean", chunk_size=128)  # noqa: E741
    assert_matches_reference(D, I, x, "euclidean", 3, atol=1e-3)
    assert I[7, 0] == 150 and D[7, 0] == 0.0


def test_gate_flags_a_noise_latent_space_against_clean_pixels(tmp_path, capsys):
    """Pixels separate the classes (purity@1 1); a latent space of pure noise (purity about
    1/3) is flagged with the gap, a latent space that keeps the classes is not."""
    rng = np.random.default_rng(0)
    n = 300
    labels = np.arange(n) % 3
    images = (rng.random((n, 6, 6, 1)) * 40 + labels[:, None, None, None] * 100).astype(np.uint8)
    data = Prepared(images, labels.astype(np.int64), np.array(["train"] * n),
                    np.arange(n, dtype=np.int64), CLASSES)
    npz = tmp_path / "prepared"
    save_prepared(npz, data)
    good = np.eye(3, dtype=np.float32)[labels] * 5 + rng.normal(size=(n, 3)).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    outs = []
    for name, x in (("good", good), ("noise", noise), ("pixels", None)):
        source = npz
        if x is not None:
            source = tmp_path / f"{name}.parquet"
            pq.write_table(pa.table({
                "id": pa.array(data.ids), "split": pa.array(data.split),
                "label": pa.array(data.labels),
                "latent": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
            }).replace_schema_metadata({b"model": name.encode(), b"latent_spread": b"0.9",
                                        b"latent_collapsed": b"false"}), source)
        outs.append(tmp_path / name / "neighbours.parquet")
        find_neighbours(NeighboursParams(k=5), source, npz, "euclidean", outs[-1],
                        outs[-1].with_name("grid.png"), "cpu")
    purity_table(outs, tmp_path / "purity.csv")
    df = pd.read_csv(tmp_path / "purity.csv", keep_default_na=False).set_index("space")
    assert df.loc["pixels", "purity_at_1"] == 1.0 and not df.loc["pixels", "flagged"]
    assert not df.loc["good", "flagged"] and df.loc["good", "flag_reason"] == ""
    noisy = df.loc["noise"]
    assert noisy["flagged"] and noisy["pixels_purity_at_1"] == 1.0
    assert noisy["purity_gap_at_1"] == pytest.approx(noisy["purity_at_1"] - 1.0)
    assert noisy["flag_reason"].startswith(
        f"purity@1 {noisy['purity_at_1']:.3f} is {1 - noisy['purity_at_1']:.3f} below raw "
        "pixels' 1.000 (margin 0.05)")
    err = capsys.readouterr().err
    assert "WARNING: latent space 'noise' (euclidean) is flagged: purity@1" in err
    assert "'good'" not in err


def test_gate_label_free_signals():
    """Without labels (purity NaN) hubs, orphans and a collapsed latent still flag a space."""
    rows = [
        ("pixels", 0.95, 16, 0.05, float("nan"), ""),
        ("ae", 0.557, 181, 0.25, 0.3, "false"),
        ("vae", float("nan"), 12, 0.06, 1e-9, "false"),
        ("autodecoder", 0.94, 14, 0.05, 0.5, "true"),
    ]
    df = pd.DataFrame([{"space": s, "metric": "cosine", "k": 5, "purity_at_1": p,
                        "purity_at_k": p, "hub_max_in_degree": h, "hub_orphan_fraction": o,
                        "backend": "faiss-cpu-flat", "seconds": 0.1, "recon_ratio": 0.5,
                        "latent_spread": sp, "latent_collapsed": c}
                       for s, p, h, o, sp, c in rows])
    out = quality_gate(df).set_index("space")
    assert out.loc["ae", "flag_reason"] == (
        "purity@1 0.557 is 0.393 below raw pixels' 0.950 (margin 0.05); 25% of images are in "
        "no neighbour list (pixels: 5%); one image is in 181 neighbour lists (pixels: at most 16)")
    assert out.loc["vae", "flag_reason"] == "latents have no variance across images (1e-09)"
    assert out.loc["autodecoder", "flag_reason"] == (
        "the latent model collapsed in training (on_collapse: warn)")
    assert not out.loc["pixels", "flagged"]


def test_results_rows_built_on_a_flagged_space_are_marked():
    from pipeline.aggregate import add_neighbour_flags

    purity = pd.DataFrame({"space": ["ae", "ae", "pixels", "vae"],
                           "metric": ["cosine", "euclidean", "cosine", "cosine"],
                           "flagged": [True, False, False, False],
                           "flag_reason": ["purity@1 low", "", "", ""]})
    # Every method's runs on a latent space's table take its gate; a refresh round mined
    # an encoder's features, and the queue source mines nothing: no gate for them.
    df = pd.DataFrame({"run": ["pixels", "latent-ae", "latent-vae", "byol-baseline",
                               "byol-weighted-ae-cosine", "byol-weighted-ae-euclidean",
                               "simclr-probabilistic-ae-cosine", "byol-weighted-ae-cosine-r2",
                               "byol-weighted-queue"],
                       "stage": ["pixels", "latent", "latent", "byol", "byol", "byol",
                                 "simclr", "byol", "byol"],
                       "source": ["", "", "", "", "latent", "latent", "latent", "refresh",
                                  "queue"],
                       "latent": [None, "ae", "vae", None, "ae", "ae", "ae", "ae", ""],
                       "metric": [None, None, None, None, "cosine", "euclidean", "cosine",
                                  "cosine", ""]})
    out = add_neighbour_flags(df, purity)
    assert out["neighbour_flag"].tolist() == [pd.NA, True, False, pd.NA, True, False, True,
                                              pd.NA, pd.NA]
    assert out["neighbour_flag_reason"].tolist() == ["", "cosine: purity@1 low", "", "",
                                                     "purity@1 low", "", "purity@1 low", "",
                                                     ""]
