"""Neighbour sources (offline table, refresh, queue), filters and the warm-up ramp."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import (
    IDS,
    OFF,
    IndexViews,
    history,
    interrupted_run,
    run,
    same_weights,
    streams,
    weights,
    write_data,
)

import pipeline.train.loop as loop
import pipeline.train.uses as uses
from pipeline import PipelineError
from pipeline.train.params import (
    ProbabilisticParams,
    TopkParams,
    TrainParams,
    WeightedParams,
)
from pipeline.train.sources import FilterParams, QueueParams, QueueSource, filter_table


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny nets: one thread is fastest."""


def write_table(path, ids, offsets, distances=None):
    """Neighbour j of row i is row (i + offsets[j]) % n."""
    n, k = len(ids), len(offsets)
    nbrs = np.stack([ids[(np.arange(n) + o) % n] for o in offsets], 1)
    dist = np.ones((n, k), np.float32) if distances is None else distances
    pq.write_table(pa.table({
        "id": pa.array(ids, pa.int64()),
        "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(nbrs.ravel(), pa.int64()), k),
        "distances": pa.FixedSizeListArray.from_arrays(
            pa.array(dist.ravel(), pa.float32()), k),
    }).replace_schema_metadata({"metric": "cosine", "k": str(k)}), path)
    return path


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "prepared")


# ------------------------------------------------------------------- filters


def test_filter_table_mutual_and_quantile_on_a_hand_made_table():
    table = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    dist = np.array([[0.1, 0.5], [0.1, 0.9], [0.2, 0.5], [0.2, 0.9]], np.float32)
    # Mutual pairs: (0,1), (0,2), (2,3); 1 -> 3 is not returned by 3 -> (2, 1)? it is: 3's
    # neighbours are 2 and 1, so (1, 3) and (3, 1) are mutual as well.
    assert filter_table(table, dist, FilterParams(mutual=True)).tolist() == table.tolist()
    one_way = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])  # 1 -> 2, but 2 -> (3, 0)
    assert filter_table(one_way, dist, FilterParams(mutual=True)).tolist() == \
        [[1, 2], [0, 1], [3, 0], [2, 3]]
    # The 0.5 quantile of the eight distances is 0.35: the far pairs become self pairs.
    assert filter_table(table, dist, FilterParams(quantile=0.5)).tolist() == \
        [[1, 0], [0, 1], [3, 2], [2, 3]]
    assert filter_table(table, dist, FilterParams(quantile=1.0)).tolist() == table.tolist()


def test_filters_that_keep_every_pair_reproduce_the_unfiltered_run_bit_for_bit(tmp_path, data):
    symmetric = write_table(tmp_path / "sym.parquet", IDS, [1, -1])  # every pair is mutual
    plain = run(tmp_path, data, "plain", "weighted", symmetric)
    kept = run(tmp_path, data, "kept", "weighted", symmetric,
               filter=FilterParams(mutual=True, quantile=1.0))
    assert same_weights(weights(plain), weights(kept))


def test_a_filter_that_rejects_every_pair_is_the_baseline_bit_for_bit(tmp_path, data):
    one_way = write_table(tmp_path / "one.parquet", IDS, [1, 2])  # no pair is mutual
    base = run(tmp_path, data, "base")
    rejected = run(tmp_path, data, "rejected", "probabilistic", one_way,
                   filter=FilterParams(mutual=True), probabilistic=ProbabilisticParams(1.0))
    unfiltered = run(tmp_path, data, "unfiltered", "probabilistic", one_way,
                     probabilistic=ProbabilisticParams(1.0))
    assert same_weights(weights(base), weights(rejected))
    assert not same_weights(weights(base), weights(unfiltered))
    # Self pairs are no neighbour use and do not count toward purity.
    rows = history(rejected)
    assert [r["neighbour_use"] for r in rows] == ["0.0", "0.0"]
    assert [r["neighbour_purity"] for r in rows] == ["", ""]


# ------------------------------------------------------------------- warm-up


def test_warm_up_ramps_the_neighbour_share_from_zero(tmp_path, data):
    n, k = 2000, 3
    table = (torch.arange(n).view(-1, 1) + torch.arange(1, k + 1)) % n
    views = IndexViews(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), table, OFF, OFF,
                       lambda x: x)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:1000]
    p = TrainParams(probabilistic=ProbabilisticParams(0.8), weighted=WeightedParams(0.6),
                    topk=TopkParams(3))
    rates = [uses._probabilistic(views, idx, streams(), p, s).neighbour_use.item()
             for s in (0.0, 0.5, 1.0)]
    assert rates[0] == 0.0 and 0.34 < rates[1] < 0.46 and 0.75 < rates[2] < 0.85
    assert uses._weighted(views, idx, streams(), p, 0.5).weights == (0.7, 0.3)
    assert uses._topk(views, idx, streams(), p, 0.0).weights == (1.0, 0.0, 0.0)
    assert uses._topk(views, idx, streams(), p, 1.0).weights == (1 / 3,) * 3
    # In training the ramp is linear in steps: 2 steps per epoch, 2 warm-up epochs.
    w = run(tmp_path, data, "ramp", "weighted", write_table(tmp_path / "nb.parquet", IDS, [1]),
            epochs=3, neighbour_warmup_epochs=2, weighted=WeightedParams(0.8))
    use = [float(r["neighbour_use"]) for r in history(w)]
    assert use == pytest.approx([0.8 * (0 + 0.25) / 2, 0.8 * (0.5 + 0.75) / 2, 0.8])


# ------------------------------------------------------------------- queue


def test_queue_neighbours_come_only_from_earlier_steps_never_the_image_itself():
    torch.manual_seed(0)
    q = QueueSource(20, 4, QueueParams(queue_size=8, k=2), 1.0, torch.device("cpu"))
    first = torch.tensor([0, 1, 2, 3])
    assert torch.equal(q.lookup(first), first[:, None].expand(4, 2))  # nothing seen: self
    z = torch.randn(20, 4)
    q.observe(first, z[first])
    # Seen anchors find the others of the earlier step, never themselves.
    found = q.lookup(first)
    assert all(set(found[i].tolist()) <= {0, 1, 2, 3} - {i} for i in range(4))
    # An unseen anchor has no query yet: self pairs, whatever the queue holds.
    assert q.lookup(torch.tensor([7])).tolist() == [[7, 7]]
    # The queue is FIFO: after 8 more targets, the first step's are gone.
    q.observe(torch.arange(4, 12), z[4:12])
    assert not set(q.lookup(torch.arange(12)).flatten().tolist()) & {0, 1, 2, 3}
    assert set(q.rows.tolist()) == set(range(4, 12))
    # Nearest by cosine: the anchor's stored target's closest queue entries, in order.
    sims = torch.nn.functional.normalize(z[4:12], dim=-1) @ \
        torch.nn.functional.normalize(z[5], dim=-1)
    sims[1] = -2  # row 5 itself is excluded
    assert q.lookup(torch.tensor([5]))[0].tolist() == (sims.topk(2).indices + 4).tolist()


@pytest.mark.parametrize("method", ["byol", "simclr"])
def test_queue_training_uses_neighbours_from_the_second_epoch_and_resumes_exactly(
        tmp_path, data, monkeypatch, method):
    kw = dict(epochs=3, queue=QueueParams(queue_size=24, k=2),
              probabilistic=ProbabilisticParams(1.0), method=method)
    straight = run(tmp_path, data, "straight", "probabilistic", source="queue", **kw)
    use = [float(r["neighbour_use"]) for r in history(straight)]
    assert use[0] == 0.0 and use[1] > 0.5 and use[2] > 0.5  # epoch 1 has no queries yet
    interrupted_run(monkeypatch, 2, tmp_path, data, "resumed", "probabilistic",
                    source="queue", **kw)
    ck = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert ck["run"] == f"{method}-probabilistic-queue" and ck["queue"]["ptr"] == 4 * 16 % 24
    resumed = run(tmp_path, data, "resumed", "probabilistic", source="queue", **kw)
    assert same_weights(weights(straight), weights(resumed))  # the queue was restored


def test_queue_topk_and_weighted_train(tmp_path, data):
    for use in ("weighted", "topk"):
        enc = run(tmp_path, data, use, use, source="queue", topk=TopkParams(3),
                  queue=QueueParams(queue_size=24, k=2))
        assert float(history(enc)[-1]["neighbour_use"]) > 0
        assert torch.load(enc, weights_only=True)["columns"]["source"] == "queue"


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("queue, message", [
    (QueueParams(queue_size=8, k=2),
     r"^config key 'train.queue.queue_size': 8 is smaller than the batch \(16\)"),
    (QueueParams(queue_size=64, k=2),
     r"^config key 'train.queue.queue_size': 64 is larger than the 40 training images"),
    (QueueParams(queue_size=20, k=20),
     r"^config key 'train.queue.k': 20 needs a queue of more than 20 targets"),
])
def test_bad_queue_settings_fail_before_training(tmp_path, data, queue, message, monkeypatch):
    monkeypatch.setattr(loop, "_epoch", lambda *a: pytest.fail("trained"))
    with pytest.raises(PipelineError, match=message):
        run(tmp_path, data, "bad", "probabilistic", source="queue", queue=queue)
    assert not (tmp_path / "bad").exists()


def test_bad_source_settings_in_the_config_name_the_key():
    from pipeline.config import validate_config

    def fails(train_cfg, message):
        with pytest.raises(PipelineError, match=message):
            validate_config({"train": {"uses": ["baseline", "probabilistic"], **train_cfg}})

    fails({"refresh_rounds": 0},
          r"^config key 'train.refresh_rounds': 0 is less than the minimum of 1")
    fails({"sources": ["queue"], "batch_size": 256, "queue": {"queue_size": 128}},
          r"^config key 'train.queue.queue_size': 128 is smaller than the batch \(256\)")
    fails({"sources": ["queue"], "queue": {"queue_size": 300, "k": 300}},
          r"^config key 'train.queue.k': 300 needs a queue of more than 300")
    fails({"sources": ["queue"], "filter": {"mutual": True}},
          r"^config key 'train.filter.mutual': queue neighbours change every step")
    fails({"sources": ["queue"], "uses": ["topk"], "topk": {"k": 9}},
          r"^config key 'train.topk.k': 9 needs 8 neighbours per image, but train.queue.k is 5")
    fails({"sources": []}, r"^config key 'train.sources'")
    # The old name of the queue source is refused by the schema.
    fails({"sources": ["online"]},
          r"^config key 'train.sources.0': 'online' is not one of \['latent', 'queue'\]")
    # The queue alone needs no latent space.
    validate_config({"latent": {"models": []}, "train": {"sources": ["queue"]}})


def test_check_data_rejects_a_queue_larger_than_the_training_set(tmp_path, data):
    from pipeline.prepare import check_data

    with pytest.raises(PipelineError, match=r"^config key 'train.queue.queue_size': 41 is "
                                            r"larger than the 40 training images in "):
        check_data(data, tmp_path / "ok.json", 3, 41)
    assert check_data(data, tmp_path / "ok.json", 3, 40)["n_training"] == 40


# ------------------------------------------------------------------- refresh


def test_refresh_round_two_mines_round_one_features_with_exactly_the_training_ids(
        tmp_path, data):
    from pipeline.embed import embed
    from pipeline.io import load_neighbours, load_prepared, read_latents, save_prepared
    from pipeline.neighbours import NeighboursParams, find_neighbours

    r1 = run(tmp_path, data, "r1", "probabilistic", write_table(tmp_path / "nb.parquet", IDS, [1]))
    features = tmp_path / "r1" / "features.parquet"
    embed(r1, data, features, "byol-probabilistic-ae-cosine", "test", "cpu")
    table = tmp_path / "r2" / "neighbours.parquet"
    find_neighbours(NeighboursParams(k=3), features, data, "cosine", table,
                    tmp_path / "r2" / "grid.png", "cpu")
    feature_ids = read_latents(features)[0]
    anchors, nbrs, _, _ = load_neighbours(table)
    assert sorted(anchors.tolist()) == IDS.tolist()  # one row per training image
    assert set(nbrs.ravel().tolist()) <= set(IDS.tolist()) and set(feature_ids) >= set(IDS)
    r2 = run(tmp_path, data, "r2", "probabilistic", table, source="refresh")
    assert not same_weights(weights(r1), weights(r2))
    ck = torch.load(r2, weights_only=True)
    assert ck["run"] == "byol-probabilistic-ae-cosine-r2"
    assert (ck["columns"]["source"], ck["columns"]["round"]) == ("refresh", 2)

    # Features of an encoder run on another data set: their ids are not this set's.
    other = load_prepared(data)
    other.ids = other.ids + 1000
    save_prepared(tmp_path / "other.npz", other)
    embed(r1, tmp_path / "other.npz", tmp_path / "other.parquet", "byol-baseline", "other",
          "cpu")
    with pytest.raises(PipelineError, match=r"other\.parquet: ids do not match the prepared "
                                            r"data set \(40 training ids missing, 52 ids unknown"):
        find_neighbours(NeighboursParams(k=3), tmp_path / "other.parquet", data, "cosine",
                        tmp_path / "bad.parquet", tmp_path / "bad.png", "cpu")
    assert not (tmp_path / "bad.parquet").exists()


def test_dag_chains_refresh_rounds_and_adds_queue_runs(workflow):
    from conftest import tiny_config

    workflow.write_config(tiny_config(
        latent={"models": ["ae"]}, neighbours={"metrics": ["cosine"]},
        train={**tiny_config()["train"], "uses": ["baseline", "weighted"],
               "sources": ["latent", "queue"], "refresh_rounds": 3,
               "queue": {"queue_size": 40}}))
    out = workflow.run("--dry-run", "--printshellcmds", "results/linear_eval.csv").stdout
    jobs = workflow.planned("results/linear_eval.csv")
    # byol-baseline, byol-weighted-ae-cosine (r1, r2, r3) and byol-weighted-queue.
    assert jobs["train"] == 5 and jobs["neighbours_refresh"] == 2 and jobs["embed"] == 2
    R = "results/synthetic"
    for rnd, prev in ((2, "byol-weighted-ae-cosine"), (3, "byol-weighted-ae-cosine-r2")):
        name = f"byol-weighted-ae-cosine-r{rnd}"
        assert (f"--source {R}/train/{prev}/seed0/features.parquet --data {R}/prepared "
                f"--out {R}/neighbours/refresh/{name}/seed0/neighbours.parquet") in out
        assert (f"train --method byol --use weighted --source refresh --round {rnd} --space ae "
                f"--metric cosine --neighbours {R}/neighbours/refresh/{name}/seed0/"
                "neighbours.parquet --seed 0") in out
        assert f"--out {R}/train/{name}/seed0/encoder.pt" in out
    assert "train --method byol --use weighted --source queue --round 1 --seed 0" in out
    assert f"--out {R}/train/byol-weighted-queue/seed0/encoder.pt" in out
    assert "--queue-size 40" in out  # checked against the prepared data before training
