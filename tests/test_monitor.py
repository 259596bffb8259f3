"""Training monitor: the per-epoch kNN on held training images against a brute-force reference,
and TensorBoard scalars read back with TensorBoard's own reader."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.augment import normalise
from pipeline.device import LAYOUT
from pipeline.io import TRAINING_SPLITS, load_prepared
from pipeline.knn import topk_correct, weighted_knn_scores
from pipeline.prepare import PrepareParams, SyntheticParams, prepare
from pipeline.train.encoder import encode_images, load_encoder, write_untrained
from pipeline.train.monitor import KnnMonitor, Scalars, held_rows

SIDE = 4


def _toy(n_per_class=120, classes=3, seed=0):
    """Grey 4x4 images whose class is which of the top rows is bright, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 60, (len(labels), SIDE, SIDE, 1))
    images[np.arange(len(labels)), labels, :, 0] += 180
    order = rng.permutation(len(labels))
    return images[order].astype(np.uint8), labels[order]


def _prepare(images):
    mean = torch.tensor([images.mean() / 255.0], dtype=torch.float32)
    std = torch.tensor([images.std() / 255.0], dtype=torch.float32)
    return lambda x: normalise(x, mean, std)


def _reference(feats, labels, queries, bank, k=20, temperature=0.07):
    """Weighted kNN top-1 the long way: every cosine similarity, one query at a time."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    hits = []
    for q in queries:
        sims = unit[bank] @ unit[q]
        top = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(labels.max() + 1)
        np.add.at(votes, labels[bank][top], np.exp(sims[top] / temperature))
        hits.append(votes.argmax() == labels[q])
    return float(np.mean(hits))


def test_held_rows_are_stratified_disjoint_labelled_and_seeded():
    labels = np.repeat([0, 1, 2, -1], [600, 300, 100, 50])
    q, b = held_rows(labels, seed=0, queries=100, bank=500)
    assert len(q) == 100 and len(b) == 500 and not np.intersect1d(q, b).size
    assert (labels[q] >= 0).all() and (labels[b] >= 0).all()
    assert np.bincount(labels[q]).tolist() == [60, 30, 10]
    assert np.bincount(labels[b]).tolist() == [300, 150, 50]
    assert (np.diff(q) > 0).all() and (np.diff(b) > 0).all()
    again, _ = held_rows(labels, seed=0, queries=100, bank=500)
    other, _ = held_rows(labels, seed=1, queries=100, bank=500)
    np.testing.assert_array_equal(q, again)
    assert not np.array_equal(q, other)
    # Fewer labelled images than asked for: both shrink in proportion, all are used.
    q, b = held_rows(labels, seed=0, queries=1000, bank=5000)
    assert (len(q), len(b)) == (167, 833)


def test_accuracy_matches_a_brute_force_reference_high_when_separable_chance_when_not():
    images, labels = _toy()
    prepare = _prepare(images)
    encoder = nn.Flatten()
    monitor = KnnMonitor(images, labels, seed=0, queries=90, bank=200, batch_size=64)
    acc = monitor(encoder, "cpu", prepare)
    feats = prepare(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).flatten(1)
    expected = _reference(feats.numpy(), labels, monitor.query_rows, monitor.bank_rows)
    assert acc == pytest.approx(expected) and acc > 0.95

    shuffled = np.random.default_rng(1).permutation(labels)
    chance = KnnMonitor(images, shuffled, seed=0, queries=150, bank=200)(encoder, "cpu",
                                                                           prepare)
    assert abs(chance - 1 / 3) < 0.12


def test_features_in_eval_mode_without_changing_the_encoder_or_the_rng():
    images, labels = _toy(n_per_class=20)
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), Probe(), nn.Dropout(0.5),
                            nn.Flatten(), nn.Linear(16, 8))
    encoder.train()
    encoder[3].eval()  # a submodule the caller froze stays frozen
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    rng = torch.get_rng_state()
    monitor = KnnMonitor(images, labels, seed=0, queries=20, bank=30, batch_size=16)
    assert monitor(encoder, torch.device("cpu"), _prepare(images)) is not None
    assert seen and all(s == (False, False) for s in seen)
    assert [m.training for m in encoder.modules()] == [True, True, True, True, False, True,
                                                       True]
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_training_loops_prepare_gives_the_evaluations_features(tmp_path, one_thread):
    """With the loop's ``prepare`` (the checkpoint's mean and std, its memory layout), on the
    memory-mapped training split: the evaluation's kNN on encoder.pt features of the rows."""
    data, path = tmp_path / "prepared", tmp_path / "encoder.pt"
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=20, size=12, channels=3)), data)
    write_untrained("smallconv", 0, data, path)
    train = load_prepared(data).view(*TRAINING_SPLITS)
    encoder, ck = load_encoder(path)
    encoder.train()

    def prep(x):
        return normalise(x, ck["mean"], ck["std"]).contiguous(memory_format=LAYOUT)

    monitor = KnnMonitor(train.images, train.labels, seed=3, queries=10, bank=30, k=5,
                         batch_size=7)
    acc = monitor(encoder, torch.device("cpu"), prep)
    assert encoder.training
    q, _ = encode_images(path, train.images, "cpu", rows=monitor.query_rows)
    b, _ = encode_images(path, train.images, "cpu", rows=monitor.bank_rows)
    np.testing.assert_allclose(monitor._features(encoder.eval(), monitor.query_rows,
                                                 torch.device("cpu"), prep), q, rtol=1e-5,
                               atol=1e-6)
    scores = weighted_knn_scores(b, train.labels[monitor.bank_rows], q, 3, 5)
    assert acc == pytest.approx(topk_correct(scores, train.labels[monitor.query_rows], 1).mean())


@pytest.mark.parametrize("labels, queries", [
    (np.full(60, -1), 1000),  # no labels
    (np.r_[np.zeros(30), np.full(30, -1)].astype(int), 1000),  # one class
    (np.repeat([0, 1], 30), 0),  # disabled
])
def test_none_without_two_labelled_classes_or_queries(labels, queries):
    images, _ = _toy(n_per_class=20)

    def never(x):
        raise AssertionError("encoded images although disabled")

    monitor = KnnMonitor(images, labels, seed=0, queries=queries)
    assert not monitor.enabled and monitor(never, "cpu", never) is None


def _read(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _row(epoch, loss, purity=""):
    return {"epoch": epoch, "loss": loss, "lr": 0.1 * epoch, "tau": "", "knn_top1": None,
            "neighbour_purity": purity, "images_per_s": 100, "collapsed": False}


def test_scalars_read_back_per_step_and_a_resumed_run_shows_each_epoch_once(tmp_path):
    folder = tmp_path / "tensorboard"
    with Scalars(folder) as scalars:
        for epoch in (1, 2, 3):
            scalars.write(_row(epoch, 1.0 / epoch, purity=0.5))
    got = _read(folder)
    assert sorted(got) == ["images_per_s", "loss", "lr", "neighbour_purity"]
    assert got["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert got["lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                         (3, pytest.approx(0.3))]
    assert got["images_per_s"] == [(s, 100.0) for s in (1, 2, 3)]

    # Killed after epoch 3, resumed from the checkpoint of epoch 2: epoch 3 again, then 4.
    with Scalars(folder, start=3) as scalars:
        scalars.write(_row(3, 0.25, purity=0.75))
        scalars.write(_row(4, 0.2), step=4)
    got = _read(folder)
    assert got["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, pytest.approx(0.2))]
    assert got["neighbour_purity"] == [(1, 0.5), (2, 0.5), (3, 0.75)]


def test_disabled_scalars_write_nothing(tmp_path):
    scalars = Scalars(None)
    scalars.write(_row(1, 1.0))
    scalars.close()
    assert list(tmp_path.iterdir()) == []
