"""Training: BYOL's EMA and loss, the neighbour uses, every method's resumable run through
the shared loop, encoder export, the registries, and bad-input errors."""

import csv
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.train.loop as loop
import pipeline.train.uses as uses
from pipeline import PipelineError
from pipeline.augment import AugmentParams
from pipeline.backbones import build_backbone, resolve_backbone
from pipeline.io import Prepared, load_prepared, save_prepared
from pipeline.train.encoder import channel_stats, encode_checkpoint, write_untrained
from pipeline.train.grid import METHOD_USES, Run
from pipeline.train.loop import train
from pipeline.train.methods.byol import Online, Target, ema_update, symmetric_loss
from pipeline.train.optim import LARS, make_optimizer, tau_at
from pipeline.train.params import (
    NnclrParams,
    ProbabilisticParams,
    TopkParams,
    TrainParams,
    WeightedParams,
)
from pipeline.train.uses import Streams, Views

TINY = dict(backbone="smallconv", epochs=2, batch_size=16, proj_dim=8, proj_hidden=16,
            warmup_epochs=1, checkpoint_every=1)
METHODS = list(METHOD_USES)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny nets: one thread is fastest and leaves the other core to parallel jobs."""


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "prepared")


def write_data(path, labels=None):
    """40 training and 12 test 8x8 images of two classes (ids 100-151); ``labels`` replaces
    the 40 training labels (the images keep their class's bar)."""
    rng = np.random.default_rng(0)
    n_train, n_test = 40, 12
    classes = np.arange(n_train + n_test) % 2
    images = rng.integers(0, 60, (n_train + n_test, 8, 8, 1)).astype(np.uint8)
    images[classes == 1, 2:6, 3:5] = 250  # class 1: a bright bar
    split = np.array(["train"] * n_train + ["test"] * n_test)
    labels = classes if labels is None else np.concatenate([labels, classes[n_train:]])
    save_prepared(path, Prepared(images, labels.astype(np.int64), split,
                                 np.arange(100, 100 + n_train + n_test, dtype=np.int64),
                                 ["a", "b"]))
    return path


def write_table(path, ids, rows):
    """A neighbours file: row i's neighbours are ids[rows[i]], (N, k), nearest first."""
    n, k = rows.shape
    nbrs = ids[rows]
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(nbrs.ravel(), pa.int64()), k),
        "distances": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ones(n * k, np.float32), pa.float32()), k),
    }).replace_schema_metadata({"purity_at_1": "0.5", "purity_at_k": "0.5",
                                "metric": "euclidean", "k": str(k)})
    pq.write_table(table, path)
    return path


def write_neighbours(path, ids, k=3):
    """Neighbour j of row i is row (i + j) % n, j = 1..k."""
    n = len(ids)
    return write_table(path, ids, (np.arange(n)[:, None] + np.arange(1, k + 1)) % n)


IDS = np.arange(100, 140, dtype=np.int64)  # the training ids of the data fixture


@pytest.fixture
def neighbours(tmp_path, data):
    return write_neighbours(tmp_path / "nb.parquet", IDS)


def as_run(method="byol", use="baseline", source=None):
    """The grid's run for a method and use: a neighbour use reads the latent source (a table
    mined in the AE's space) unless ``source`` says otherwise (``refresh``: round 2)."""
    if use == "baseline" and not source:
        return Run(method)
    source = source or "latent"
    if source == "queue":
        return Run(method, use, "queue")
    return Run(method, use, source, "ae", "cosine", 2 if source == "refresh" else 1)


def run(tmp_path, data, name, use="baseline", nb=None, seed=0, method="byol", source=None,
        **kw):
    d = tmp_path / name
    out = d / "encoder.pt"
    train(TrainParams(**{**TINY, **kw}), as_run(method, use, source), seed, data, nb, out,
          d / "state.pt", d / "history.csv", d / "loss.png", "cpu")
    return out


def history(path):
    with open(path.parent / "history.csv") as fh:
        return list(csv.DictReader(fh))


def interrupted_run(monkeypatch, epoch, *args, **kw):
    """:func:`run`, killed as Ctrl-C would kill it at the start of (0-based) ``epoch``;
    the patch is undone before returning, so the next run resumes."""
    real_stream = loop._stream

    def killed(seed, e, stream):
        if e == epoch:
            raise KeyboardInterrupt("killed")
        return real_stream(seed, e, stream)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_stream", killed)
        with pytest.raises(KeyboardInterrupt):
            run(*args, **kw)


def weights(path):
    return torch.load(path, weights_only=True)["encoder"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def tiny_online():
    torch.manual_seed(0)
    return Online(build_backbone("smallconv", 1, 8), 16, 8)


# ------------------------------------------------------------------- EMA, loss, target


def test_ema_matches_hand_computation_and_copies_buffers():
    online = tiny_online()
    target = Target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in target.parameters():
            p.fill_(0.0)
        online.encoder.features[1].running_mean.fill_(3.0)
    ema_update(target, online, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in target.parameters())
    ema_update(target, online, 0.5)  # 0.5 * 0.1 + 0.5 * 1
    assert all(torch.allclose(p, torch.full_like(p, 0.55)) for p in target.parameters())
    assert torch.equal(target.encoder.features[1].running_mean, torch.full((32,), 3.0))
    assert tau_at(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_at(50, 100, 0.99) == pytest.approx(0.995)
    assert tau_at(100, 100, 0.99) == pytest.approx(1.0)
    assert tau_at(25, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_target_has_no_gradients_and_is_not_optimised():
    online = tiny_online()
    target = Target(online)
    assert not any(p.requires_grad for p in target.parameters())
    for name in ("adamw", "sgd", "lars"):
        opt = make_optimizer(name, online, 0.1, 1e-4)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in online.parameters()}
        assert not in_opt & {id(p) for p in target.parameters()}
    x = torch.rand(4, 1, 8, 8)
    _, p1 = online(x)
    _, p2 = online(x.flip(-1))
    with torch.no_grad():
        z1, z2 = target(x), target(x.flip(-1))
    symmetric_loss(p1, p2, z1, z2).backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())


def test_loss_is_symmetric_and_matches_hand_values():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    assert torch.equal(symmetric_loss(p1, p2, z1, z2), symmetric_loss(p2, p1, z2, z1))
    z = torch.randn(3, 4, generator=g)
    assert symmetric_loss(z, z, 2 * z, 3 * z).item() == pytest.approx(0.0, abs=1e-6)
    assert symmetric_loss(z, z, -z, -z).item() == pytest.approx(8.0)  # 4 per view order
    e = torch.eye(2)
    assert symmetric_loss(e[:1], e[:1], e[1:], e[1:]).item() == pytest.approx(4.0)


def test_lars_trust_ratio_step():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]).view(1, 2))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.0},
                     {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
                    lr=1.0, eta=0.01)
    w.grad = torch.tensor([[0.0, 10.0]])  # ||g|| = 10 -> trust 0.01 * 5 / 10
    b.grad = torch.tensor([2.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 0.005 * 10]]))
    assert torch.allclose(b.detach(), torch.tensor([-1.0]))  # plain SGD step


# ------------------------------------------------------------------- neighbour uses


class IndexViews(Views):
    """Views that return the image index itself, to see which image fed each view."""

    def view(self, idx, g, which):
        return idx.clone()


def streams(seed=1):
    return Streams(*(torch.Generator().manual_seed(seed + i) for i in range(3)))


OFF = AugmentParams(blur_prob=0.0, solarize_prob=0.0)


def test_probabilistic_uses_neighbours_at_the_rate_per_sample():
    n, k = 2000, 5
    table = (torch.arange(n).view(-1, 1) + torch.arange(1, k + 1)) % n
    views = IndexViews(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), table, OFF, OFF,
                       lambda x: x)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:512]
    fracs = {}
    for p in (0.0, 0.5, 1.0):
        b = uses._probabilistic(views, idx, streams(),
                                TrainParams(probabilistic=ProbabilisticParams(p_neighbour=p)))
        assert torch.equal(b.v1, idx)
        from_nb = b.v2 != idx
        fracs[p] = from_nb.float().mean().item()
        assert b.neighbour_use == pytest.approx(fracs[p])
        offsets = ((b.v2 - idx) % n)[from_nb]
        assert bool(((offsets >= 1) & (offsets <= k)).all())  # always one of the k neighbours
        if p == 0.5:
            # per-sample choice: every neighbour rank used, roughly uniformly
            counts = torch.bincount(offsets, minlength=k + 1)[1:]
            assert (counts > 0.1 * from_nb.sum()).all()
    assert fracs[0.0] == 0.0 and fracs[1.0] == 1.0
    assert 0.43 < fracs[0.5] < 0.57


def test_per_view_parameters_act_on_their_own_view_only():
    images = torch.from_numpy(np.random.default_rng(0).integers(
        0, 256, (16, 8, 8, 1)).astype(np.uint8))
    idx = torch.arange(16)
    keep = AugmentParams(blur_prob=0.0, solarize_prob=0.0, crop_min_scale=1.0, flip_prob=0.0,
                         jitter_prob=0.0)
    solar = AugmentParams(**{**keep.__dict__, "solarize_prob": 1.0})
    blur = AugmentParams(**{**keep.__dict__, "blur_prob": 1.0, "crop_min_scale": 0.5})

    def batch(a1, a2):
        return uses._baseline(Views(images, None, a1, a2, lambda x: x), idx, streams(),
                              TrainParams())

    plain = batch(keep, keep)
    x = images.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(plain.v1, x, atol=1e-5) and torch.allclose(plain.v2, x, atol=1e-5)
    b = batch(solar, keep)  # view 1 solarised, view 2 untouched, bit for bit
    assert torch.allclose(b.v1, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)
    assert torch.equal(b.v2, plain.v2)
    b = batch(keep, blur)  # view 2 cropped and blurred, view 1 untouched, bit for bit
    assert torch.equal(b.v1, plain.v1) and not torch.allclose(b.v2, plain.v2, atol=1e-3)


def test_schema_defaults_build_the_dataclass_defaults_with_the_papers_views():
    from pipeline.config import build, validate_config
    from pipeline.train.grid import train_params

    cfg = validate_config({})
    for method, takes in METHOD_USES.items():
        for use in takes:
            for source in ("latent", "queue") if use != "baseline" else ("",):
                run = as_run(method, use, source)
                assert build(TrainParams, train_params(cfg, run)) == \
                    TrainParams(checkpoint_every=5), run.name
    p = TrainParams()
    assert (p.view1.blur_prob, p.view1.solarize_prob) == (1.0, 0.0)
    assert (p.view2.blur_prob, p.view2.solarize_prob) == (0.1, 0.2)
    # A view's key overrides train.augment for that view only; symmetric views stay possible.
    cfg = validate_config({"train": {"augment": {"crop_min_scale": 0.5},
                                     "view2": {"crop_min_scale": 0.9, "blur_prob": 1.0,
                                               "solarize_prob": 0.0}}})
    for method in METHODS:  # every method trains on the same views
        p = build(TrainParams, train_params(cfg, Run(method)))
        assert p.view1.crop_min_scale == 0.5 and p.view2.crop_min_scale == 0.9
        assert p.view2 == AugmentParams(blur_prob=1.0, solarize_prob=0.0, crop_min_scale=0.9)


def test_lars_trust_coefficient_and_exclusions_are_configurable():
    online = tiny_online()
    opt = make_optimizer("lars", online, 0.1, 1e-4, eta=0.5, wd_exclude=False,
                         lars_exclude=False)
    assert [g["eta"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, False]
    opt = make_optimizer("lars", online, 0.1, 1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    assert opt.param_groups[0]["eta"] == TrainParams().lars_eta == 0.02


def test_weighted_with_zero_weight_equals_baseline_exactly(tmp_path, data, neighbours):
    a = run(tmp_path, data, "base")
    b = run(tmp_path, data, "w0", "weighted", neighbours, weighted=WeightedParams(0.0))
    c = run(tmp_path, data, "w5", "weighted", neighbours, weighted=WeightedParams(0.5))
    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))
    # Probabilistic with p = 0 never takes a neighbour, so it is also the baseline.
    d = run(tmp_path, data, "p0", "probabilistic", neighbours,
            probabilistic=ProbabilisticParams(0.0))
    assert same_weights(weights(a), weights(d))


def test_simclr_probabilistic_with_p_0_is_simclrs_baseline_exactly(tmp_path, data, neighbours):
    a = run(tmp_path, data, "base", method="simclr")
    b = run(tmp_path, data, "p0", "probabilistic", neighbours, method="simclr",
            probabilistic=ProbabilisticParams(0.0))
    c = run(tmp_path, data, "p1", "probabilistic", neighbours, method="simclr",
            probabilistic=ProbabilisticParams(1.0))
    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))


def test_topk_with_k_1_is_the_baseline_and_larger_k_averages_the_nearest(tmp_path, data,
                                                                          neighbours):
    a = run(tmp_path, data, "base")
    b = run(tmp_path, data, "k1", "topk", neighbours, topk=TopkParams(1))
    c = run(tmp_path, data, "k3", "topk", neighbours, topk=TopkParams(3))
    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))
    n, k = 50, 4
    table = (torch.arange(n).view(-1, 1) + torch.arange(1, k + 1)) % n
    views = IndexViews(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), table, OFF, OFF,
                       lambda x: x)
    idx = torch.tensor([0, 7, 49])
    bt = uses._topk(views, idx, streams(), TrainParams(topk=TopkParams(3)))
    assert torch.equal(bt.v1, idx) and torch.equal(bt.v2, idx)
    # The nearest k - 1 neighbours, in order, for both views; equal weights summing to 1.
    assert [t.tolist() for t in bt.n1] == [[1, 8, 0], [2, 9, 1]]
    assert [t.tolist() for t in bt.n2] == [[1, 8, 0], [2, 9, 1]]
    assert bt.weights == (1 / 3,) * 3 and bt.neighbour_use == pytest.approx(2 / 3)
    assert bt.pairs[0].tolist() == [0, 0, 7, 7, 49, 49]
    assert bt.pairs[1].tolist() == [1, 2, 8, 9, 0, 1]
    with pytest.raises(PipelineError, match=r"^config key 'train.topk.k': 5 needs 4 neighbours "
                                            r"per image, but .* holds 3; raise neighbours.k"):
        run(tmp_path, data, "k5", "topk", neighbours, topk=TopkParams(5))
    from pipeline.config import validate_config  # the same mistake in config.yaml, up front

    with pytest.raises(PipelineError, match=r"^config key 'train.topk.k': 7 needs 6 neighbours "
                                            r"per image, but neighbours.k is 5; raise"):
        validate_config({"train": {"uses": ["topk"], "topk": {"k": 7}}})
    validate_config({"train": {"uses": ["baseline"], "topk": {"k": 7}}})


def test_neighbour_purity_per_epoch_matches_a_hand_count(tmp_path, data, neighbours):
    def purity(name, use, nb, **kw):
        run(tmp_path, data, name, use, nb, epochs=2, **kw)
        return [r["neighbour_purity"] for r in history(tmp_path / name / "encoder.pt")]

    # Neighbour j of row i is row (i + j) % 40 and labels alternate, so the nearest is always
    # of the other class, the second always of the same class.
    assert purity("k2", "topk", neighbours, topk=TopkParams(2)) == ["0.0", "0.0"]
    assert purity("k3", "topk", neighbours, topk=TopkParams(3)) == ["0.5", "0.5"]
    assert purity("base", "baseline", None) == ["", ""]
    assert purity("p0", "probabilistic", neighbours,
                  probabilistic=ProbabilisticParams(0.0)) == ["", ""]
    # Unknown labels (-1) are left out of the count: rows 0-9 unlabelled, one step per epoch
    # over all 40 rows.
    labels = np.arange(40) % 2
    labels[:10] = -1
    write_data(tmp_path / "part.npz", labels)
    row = np.arange(40)
    same = known = 0
    for j in (1, 2):
        a, b = labels[row], labels[(row + j) % 40]
        known += int(((a >= 0) & (b >= 0)).sum())
        same += int(((a >= 0) & (b >= 0) & (a == b)).sum())
    assert (same, known) == (28, 57)  # i = 10..38 with i + 1; i = 10..37 with i + 2
    run(tmp_path, tmp_path / "part.npz", "part", "topk", neighbours, topk=TopkParams(3),
        batch_size=40)
    assert [r["neighbour_purity"] for r in history(tmp_path / "part" / "encoder.pt")] == [
        str(round(same / known, 4))] * 2
    summary = torch.load(tmp_path / "part" / "encoder.pt", weights_only=True)["summary"]
    assert summary["neighbour_purity"] == round(same / known, 4)


@pytest.mark.parametrize("k", [1, 3])
def test_nnclr_purity_log_matches_a_hand_count_of_its_queue_pairs(tmp_path, data, k):
    """One epoch of two steps of 20, a queue of 20: step 1 finds an empty queue, step 2 finds
    exactly step 1's images. Labelling step 1's images 0 fixes every pair's agreement,
    whichever entry NNCLR picks: an anchor labelled 0 agrees, 1 disagrees, -1 is left out."""
    order = torch.randperm(40, generator=loop._stream(0, 0, 0)).numpy()  # the loop's order
    first, second = order[:20], order[20:]
    labels = np.zeros(40, np.int64)
    labels[second[12:17]] = 1
    labels[second[17:]] = -1
    write_data(tmp_path / "labelled.npz", labels)
    same, known = 12, 17  # second's anchors labelled 0, and labelled at all; first: all 0
    assert (labels[first] == 0).all() and (labels[second] == 0).sum() == same
    out = run(tmp_path, tmp_path / "labelled.npz", "nnclr", method="nnclr", epochs=1,
              warmup_epochs=0, batch_size=20, nnclr=NnclrParams(queue_size=20, k=k))
    (row,) = history(out)
    assert row["neighbour_purity"] == str(round(same / known, 4)) == "0.7059"
    assert row["neighbour_use"] == "0.5"  # no entry in step 1, one per anchor in step 2
    summary = torch.load(out, weights_only=True)["summary"]
    assert summary["neighbour_purity"] == round(same / known, 4)


def test_simclr_probabilistic_at_p_1_trains_on_neighbour_views(tmp_path, data):
    """Every second view is a neighbour's; the purity log is the table's purity, since rows
    0-29 list only same-class neighbours and rows 30-39 only other-class ones, and batches
    of 20 show every anchor once per epoch."""
    row = np.arange(40)[:, None]
    rows = np.where(row < 30, row + [2, 4, 6], row + [1, 3, 5]) % 40
    table = write_table(tmp_path / "nb.parquet", IDS, rows)
    labels = np.arange(40) % 2
    table_purity = float((labels[rows] == labels[:, None]).mean())
    assert table_purity == 0.75
    out = run(tmp_path, data, "p1", "probabilistic", table, method="simclr", batch_size=20,
              probabilistic=ProbabilisticParams(1.0))
    rows_logged = history(out)
    assert [r["neighbour_use"] for r in rows_logged] == ["1.0", "1.0"]
    assert [float(r["neighbour_purity"]) for r in rows_logged] == [table_purity] * 2
    ck = torch.load(out, weights_only=True)
    assert ck["run"] == "simclr-probabilistic-ae-cosine" and ck["columns"] == {
        "stage": "simclr", "method": "simclr", "variant": "probabilistic", "source": "latent",
        "latent": "ae", "metric": "cosine", "round": 1}
    assert ck["summary"]["neighbour_use"] == 1.0


def test_method_and_use_registries_agree_with_the_schema_and_the_grid():
    from dataclasses import asdict

    from pipeline.codeinputs import module_files, stage_module
    from pipeline.config import METHODS as SCHEMA_METHODS
    from pipeline.config import USES as SCHEMA_USES
    from pipeline.config import load_schema
    from pipeline.train.encoder import init_encoder
    from pipeline.train.methods import METHODS as REGISTRY
    from pipeline.train.methods import PAPERS, build_method

    assert list(REGISTRY) == list(SCHEMA_METHODS) == list(METHOD_USES) == list(PAPERS)
    assert list(uses.USES) == list(SCHEMA_USES)
    schema = load_schema()["properties"]
    train_schema = schema["train"]["properties"]
    assert set(uses.USES) >= set(train_schema["uses"]["default"])
    assert set(REGISTRY) >= set(train_schema["methods"]["default"])
    for method, takes in METHOD_USES.items():
        # Every method has a baseline; a use it takes is a registered one.
        assert takes[0] == "baseline" and set(takes) <= set(uses.USES), method
    assert set(METHOD_USES["byol"]) == set(uses.USES)  # BYOL mixes targets: it takes all
    # The uses that read neighbours are every one but the baseline.
    assert {n for n, u in uses.USES.items() if u.needs_neighbours} == set(uses.USES) - {
        "baseline"}
    for name in [*REGISTRY, *uses.USES]:
        assert name.isalpha() and name.islower()  # run names join their parts with "-"
    for method in REGISTRY:
        for use in METHOD_USES[method]:
            for source in ("latent", "queue") if use != "baseline" else ("",):
                assert as_run(method, use, source).name.split("-")[:2] == [method, use]
    # A use's own keys live in train.<use>, a method's in its own section; TrainParams carries
    # each, and the method's constructor takes exactly its section's keys.
    p = TrainParams()
    for use in set(uses.USES) - {"baseline"}:
        assert set(asdict(getattr(p, use))) == set(train_schema[use]["properties"]), use
    encoder = init_encoder("smallconv", 0, 1, 8)
    for method, cls in REGISTRY.items():
        own = getattr(p, method)
        assert set(asdict(own)) == set(schema[method]["properties"]), method
        assert isinstance(build_method(method, encoder, 16, 8, own), cls)
    # The train rule's code inputs are the package: every file of pipeline/train.
    package = sorted(str(f) for f in Path(loop.__file__).parent.rglob("*.py"))
    assert set(package) <= set(module_files(*stage_module("train")))


# ------------------------------------------------------------------- training, resume, export


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path, data, monkeypatch,
                                                                  capsys):
    straight = run(tmp_path, data, "straight", epochs=3)
    interrupted_run(monkeypatch, 2, tmp_path, data, "resumed", epochs=3)
    state = tmp_path / "resumed" / "state.pt"
    assert state.exists() and not (tmp_path / "resumed" / "encoder.pt").exists()
    ck = torch.load(state, weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 4 and len(ck["history"]) == 2
    assert set(ck) >= {"params", "run", "seed", "data", "code", "model", "optimizer", "rng",
                       "history", "provenance"}
    assert ck["run"] == "byol-baseline"
    assert {k.split(".")[0] for k in ck["model"]} == {"online", "target"}
    capsys.readouterr()
    resumed = run(tmp_path, data, "resumed", epochs=3)
    assert "resuming from epoch 2" in capsys.readouterr().err
    assert same_weights(weights(straight), weights(resumed))
    assert state.samefile(resumed)  # the finished state is kept, as the encoder's hard link
    hist = (tmp_path / "resumed" / "history.csv").read_text().splitlines()
    assert hist[0] == ("epoch,loss,lr,tau,neighbour_use,neighbour_purity,spread,knn_top1,"
                       "images_per_s,seconds")
    assert len(hist) == 4 and (tmp_path / "resumed" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_resumes_bit_for_bit_after_an_interrupt(tmp_path, data, monkeypatch,
                                                             method):
    """Killed in epoch 2 of 2 after epoch 1's checkpoint, the resumed run ends with exactly
    the weights and losses of a run never interrupted: the method's whole state (BYOL's
    target, NNCLR's queue) and the optimiser's travel in the checkpoint. NNCLR's queue of 24
    wraps within an epoch, and k = 2 makes it draw from the neighbour stream."""
    kw = dict(epochs=2, checkpoint_every=1, nnclr=NnclrParams(queue_size=24, k=2))
    straight = run(tmp_path, data, "straight", method=method, **kw)
    interrupted_run(monkeypatch, 1, tmp_path, data, "resumed", method=method, **kw)
    ck = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 2 and ck["run"] == f"{method}-baseline"
    assert not (tmp_path / "resumed" / "encoder.pt").exists()
    if method == "nnclr":
        # Two steps of 16 in 24 slots: full, and wrapped to slot 32 - 24.
        assert bool((ck["model"]["queue_rows"] >= 0).all()) and ck["model"]["queue_ptr"] == 8
    resumed = run(tmp_path, data, "resumed", method=method, **kw)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in history(p)] for p in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert torch.load(resumed, weights_only=True)["columns"]["stage"] == method


def test_finished_training_whose_outputs_were_discarded_is_not_trained_again(
        tmp_path, data, monkeypatch, capsys):
    first = run(tmp_path, data, "x", epochs=3)
    log = capsys.readouterr().err
    epochs = [line.split(" train ", 1)[1] for line in log.splitlines() if " epoch " in line]
    assert len(epochs) == 3 and "\r" not in log
    assert epochs[0].startswith("epoch 1/3 loss ") and " lr " in epochs[0]
    assert " img/s ETA " in epochs[0] and epochs[2].endswith("ETA 0:00:00")
    kept = weights(first)
    # What Snakemake does to the outputs of a job it counts as incomplete (Ctrl-C, kill -9).
    for name in ("encoder.pt", "history.csv", "loss.png"):
        (tmp_path / "x" / name).unlink()
    real_epoch = loop._epoch
    monkeypatch.setattr(loop, "_epoch", lambda *a: pytest.fail("trained again"))
    again = run(tmp_path, data, "x", epochs=3)
    assert "training already finished" in capsys.readouterr().err
    assert same_weights(kept, weights(again))
    assert len((tmp_path / "x" / "history.csv").read_text().splitlines()) == 4
    assert (tmp_path / "x" / "loss.png").stat().st_size > 0
    # Other params (or data, or code) train afresh.
    monkeypatch.setattr(loop, "_epoch", real_epoch)
    run(tmp_path, data, "x", epochs=2)
    assert "ignoring" in capsys.readouterr().err


def test_stale_state_for_other_params_is_ignored(tmp_path, data, monkeypatch, capsys):
    interrupted_run(monkeypatch, 1, tmp_path, data, "x")
    capsys.readouterr()
    run(tmp_path, data, "x", lr=0.001)
    assert "ignoring" in capsys.readouterr().err


def test_encode_checkpoint_features_and_flat_summary(tmp_path, data, neighbours):
    out = run(tmp_path, data, "p", "probabilistic", neighbours,
              probabilistic=ProbabilisticParams(1.0))
    prepared = load_prepared(data)
    feats, summary = encode_checkpoint(out, prepared, "cpu")
    assert feats.shape == (len(prepared.images), 512) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert summary["variant"] == "probabilistic" and summary["backbone"] == "smallconv"
    assert {k: summary[k] for k in ("stage", "method", "source", "latent", "metric", "round")
            } == {"stage": "byol", "method": "byol", "source": "latent", "latent": "ae",
                  "metric": "cosine", "round": 1}
    assert summary["epochs"] == 2 and summary["neighbour_use"] == 1.0
    assert summary["collapsed"] is False
    assert all(isinstance(v, (int, float, str, bool)) for v in summary.values())
    assert {"train_seconds", "device", "final_loss"} <= set(summary)
    # Same features in any batch size: no augmentation, eval mode.
    again, _ = encode_checkpoint(out, prepared, "cpu", batch_size=7)
    np.testing.assert_allclose(feats, again, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, channels, size", [("smallconv", 1, 8), ("smallconv", 3, 32),
                                                   ("resnet18_cifar", 3, 8)])
def test_channels_last_layout_changes_speed_not_results(name, channels, size):
    """The pipeline runs every model in LAYOUT (channels-last); the maths must not move."""
    from pipeline.device import LAYOUT

    torch.manual_seed(0)
    online = Online(build_backbone(name, channels, size), 16, 8)
    wide = Online(build_backbone(name, channels, size), 16, 8)
    wide.load_state_dict(online.state_dict())
    wide.to(memory_format=LAYOUT)
    x = torch.randn(6, channels, size, size)
    results = []
    for net, batch in ((online, x), (wide, x.contiguous(memory_format=LAYOUT))):
        h, p = net(batch)
        p.square().sum().backward()
        results.append((h, p, net.encoder.parameters().__next__().grad))
    assert wide.encoder.parameters().__next__().is_contiguous(memory_format=LAYOUT)
    for a, b in zip(*results, strict=True):  # equal up to fp32 summation order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * a.abs().max().item())


def test_precision_sets_the_steps_arithmetic_and_bf16_trains_on_the_cpu(tmp_path, data):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32),
                             ("bf16", torch.bfloat16)):
        with loop.autocast_for(precision, cpu):
            assert (a @ b).dtype == dtype, precision
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train(TrainParams(**TINY, precision=precision), Run("byol"), 0, data, None,
              out / "enc.pt", out / "s.pt", out / "h.csv", out / "l.png", "cpu")
        rows[precision] = np.genfromtxt(out / "h.csv", delimiter=",", names=True)
        summary = torch.load(out / "enc.pt", weights_only=True)["summary"]
        assert summary["precision"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    # Same seed, same data: bf16 rounding moves the loss a little, never to NaN or far.
    assert np.isfinite(rows["bf16"]["loss"]).all()
    assert not np.array_equal(rows["bf16"]["loss"], rows["fp32"]["loss"])
    np.testing.assert_allclose(rows["bf16"]["loss"], rows["fp32"]["loss"], rtol=0.1)


def test_untrained_writes_only_the_seeded_initial_encoder(tmp_path, data, monkeypatch):
    d = tmp_path / "u"
    for name in ("a", "b"):
        write_untrained("smallconv", 3, data, d / f"{name}.pt")
    assert sorted(p.name for p in d.iterdir()) == ["a.pt", "b.pt"]
    assert same_weights(weights(d / "a.pt"), weights(d / "b.pt"))
    feats, summary = encode_checkpoint(d / "a.pt", load_prepared(data), "cpu")
    assert summary["stage"] == "untrained" and summary["epochs"] == 0
    assert feats.shape == (52, 512)
    # It is the draw every method's training run with that seed starts from.
    starts = {}
    monkeypatch.setattr(loop, "_epoch", lambda lp, *a: (
        starts.setdefault(lp.run.method, {k: v.clone() for k, v in
                                          lp.model.encoder.state_dict().items()}),
        (_ for _ in ()).throw(KeyboardInterrupt()))[1])
    for method in METHODS:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, data, f"start-{method}", seed=3, method=method)
        assert same_weights(starts[method], weights(d / "a.pt")), method


def test_untrained_command_line_writes_no_training_files(tmp_path, data):
    from pipeline.__main__ import main

    out = tmp_path / "u" / "encoder.pt"
    assert main(["untrained", "--backbone", "smallconv", "--seed", "1", "--data", str(data),
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder.pt"]


def test_one_train_call_trains_each_seed_as_its_own_call_does(tmp_path, data, neighbours,
                                                              capsys):
    """train.seeds_in_one_job: one process trains a run's seeds one after another; each
    seed's encoder and history equal a separate call's, and its files are its own."""
    import json

    from pipeline.__main__ import main

    params = json.dumps({**TINY, "weighted.pos_weight": 0.5})
    common = ["train", "--method", "byol", "--use", "weighted", "--source", "latent",
              "--space", "ae", "--metric", "cosine", "--neighbours", str(neighbours),
              "--params", params, "--device", "cpu", "--data", str(data)]

    def files(d, seeds):
        return [arg for name in ("out", "state", "history", "loss-plot")
                for arg in (f"--{name}", *(str(d / f"s{s}" / f"{name}.x") for s in seeds))]

    assert main([*common, "--seed", "0", "1", *files(tmp_path / "together", (0, 1))]) == 0
    for seed in (0, 1):
        assert main([*common, "--seed", str(seed),
                     *files(tmp_path / "alone", (seed,))]) == 0
        got, want = (tmp_path / w / f"s{seed}" for w in ("together", "alone"))
        assert same_weights(weights(got / "out.x"), weights(want / "out.x")), seed
        losses = [[r["loss"] for r in csv.DictReader(open(d / "history.x"))]
                  for d in (got, want)]
        assert losses[0] == losses[1] and len(losses[0]) == TINY["epochs"], seed
    assert not same_weights(weights(tmp_path / "together/s0/out.x"),
                            weights(tmp_path / "together/s1/out.x"))

    # Counts that do not match, or two seeds writing one file, are refused before any work.
    capsys.readouterr()
    bad = files(tmp_path / "bad", (0, 1))
    bad[bad.index("--history") + 2:bad.index("--loss-plot")] = []
    assert main([*common, "--seed", "0", "1", *bad]) == 2
    assert capsys.readouterr().err == (
        "error: train: 2 --seed and 1 --history values; give one per --seed\n")
    assert main([*common, "--seed", "0", "0", *files(tmp_path / "bad", (0, 1))]) == 2
    assert capsys.readouterr().err == "error: train: --seed 0 0 repeats a seed\n"
    assert main([*common, "--seed", "0", "1", *files(tmp_path / "bad", (0, 0))]) == 2
    assert capsys.readouterr().err == ("error: train: --out names a file twice; each seed "
                                       "writes its own\n")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name, channels, size, dim", [
    ("smallconv", 1, 8, 512), ("smallconv", 1, 28, 512), ("smallconv", 3, 16, 512),
    ("resnet18_cifar", 3, 32, 512), ("resnet18_cifar", 1, 32, 512),
    ("resnet18", 3, 64, 512), ("resnet18", 1, 96, 512), ("resnet50", 3, 64, 2048),
])
def test_backbones_map_their_sizes_to_vectors(name, channels, size, dim):
    net = build_backbone(name, channels, size).eval()
    with torch.no_grad():
        out = net(torch.rand(2, channels, size, size))
    assert out.shape == (2, dim) and net.out_dim == dim


def test_auto_backbone_by_image_side():
    assert [resolve_backbone("auto", s) for s in (8, 28, 31, 32, 63, 64, 96)] == [
        "smallconv", "smallconv", "smallconv", "resnet18_cifar", "resnet18_cifar", "resnet18",
        "resnet18"]


# ------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_problem_and_leave_no_output(tmp_path, data, neighbours,
                                                        monkeypatch):
    import pipeline.train.methods.byol as byol_method
    import pipeline.train.methods.simclr as simclr_method

    out = tmp_path / "bad" / "encoder.pt"
    with pytest.raises(PipelineError, match=r"^config key 'train.probabilistic.p_neighbour': "
                                            r"1\.5 is greater than the maximum of 1$"):
        run(tmp_path, data, "bad", "probabilistic", neighbours,
            probabilistic=ProbabilisticParams(1.5))
    with pytest.raises(PipelineError, match=r"^config key 'train.weighted.pos_weight': "
                                            r"-0\.1 is less than the minimum of 0$"):
        run(tmp_path, data, "bad", "weighted", neighbours, weighted=WeightedParams(-0.1))
    with pytest.raises(PipelineError, match=r"^the latent source needs a neighbours file "
                                            r"\(--neighbours\)$"):
        run(tmp_path, data, "bad", "weighted", None)
    with pytest.raises(PipelineError, match=r"^the 'weighted' use needs a neighbour source "
                                            r"\(--source\)$"):
        train(TrainParams(**TINY), Run("byol", "weighted"), 0, data, neighbours, out,
              out.parent / "s.pt", out.parent / "h.csv", out.parent / "l.png", "cpu")
    with pytest.raises(PipelineError, match=r"^the queue source reads no neighbours file; "
                                            r"drop --neighbours$"):
        run(tmp_path, data, "bad", "weighted", neighbours, source="queue")
    with pytest.raises(PipelineError, match=r"^unknown method 'moco'; choose one of: byol, "
                                            r"simclr, nnclr$"):
        run(tmp_path, data, "bad", method="moco")
    with pytest.raises(PipelineError, match=r"^config key 'train.uses': byol cannot take the "
                                            r"'nnclr' use; it takes \['baseline', "
                                            r"'probabilistic', 'weighted', 'topk'\]$"):
        run(tmp_path, data, "bad", "nnclr", neighbours)
    with pytest.raises(PipelineError, match=r"^unknown backbone 'vit'; choose one of: auto, "
                                            r"smallconv, resnet18_cifar, resnet18, resnet50$"):
        run(tmp_path, data, "bad", backbone="vit")
    other = write_neighbours(tmp_path / "other.parquet", np.arange(40, dtype=np.int64))
    with pytest.raises(PipelineError, match=rf"^neighbours file {other} is for another data "
                                            r"set: ids do not match the 40 training ids of the "
                                            r"prepared data \(40 rows, 160 unknown ids\)$"):
        run(tmp_path, data, "bad", "probabilistic", other)
    assert not out.exists()

    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(byol_method, "symmetric_loss", lambda *a: nan)
    with pytest.raises(PipelineError, match=r"^byol-baseline diverged: loss is nan in epoch 1; "
                                            r"lower train.lr or check the data$"):
        run(tmp_path, data, "bad")
    monkeypatch.setattr(simclr_method, "nt_xent", lambda *a: nan)
    with pytest.raises(PipelineError, match=r"^simclr-probabilistic-ae-cosine diverged: loss "
                                            r"is nan in epoch 1; lower train.lr or check the "
                                            r"data$"):
        run(tmp_path, data, "bad", "probabilistic", neighbours, method="simclr")
    assert not out.exists() and not (tmp_path / "bad" / "history.csv").exists()


def test_a_method_refuses_a_use_it_cannot_take_before_any_work(tmp_path, data, neighbours,
                                                              monkeypatch):
    monkeypatch.setattr(loop, "_epoch", lambda *a: pytest.fail("trained"))
    d = tmp_path / "bad"
    with pytest.raises(PipelineError) as err:
        train(TrainParams(**TINY), Run("simclr", "weighted", "latent", "ae", "cosine"), 0, data,
              neighbours, d / "encoder.pt", d / "state.pt", d / "history.csv", d / "loss.png",
              "cpu")
    assert str(err.value) == ("config key 'train.uses': simclr cannot take the 'weighted' use; "
                              "it takes ['baseline', 'probabilistic']")
    with pytest.raises(PipelineError) as err:
        run(tmp_path, data, "bad", "probabilistic", source="queue", method="nnclr")
    assert str(err.value) == ("config key 'train.uses': nnclr cannot take the 'probabilistic' "
                              "use; it takes ['baseline']")
    assert not d.exists()


def test_collapse_is_flagged_loudly(tmp_path, data, monkeypatch, capsys):
    # Any real spread is below an (absurd) threshold of 10x the isotropic value.
    monkeypatch.setattr(loop, "COLLAPSE_FRACTION", 10.0)
    out = run(tmp_path, data, "c", epochs=1)
    assert "WARNING: representation collapse in byol-baseline seed 0" in capsys.readouterr().err
    assert torch.load(out, weights_only=True)["summary"]["collapsed"] is True


def test_channel_stats_match_numpy_in_chunks():
    x = np.random.default_rng(0).integers(0, 256, (37, 4, 5, 3)).astype(np.uint8)
    mean, std = channel_stats(x, chunk=8)
    ref = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-8)


def test_a_batch_larger_than_the_training_set_is_clamped_with_a_warning_and_a_note(
        tmp_path, data, capsys):
    out = run(tmp_path, data, "big", batch_size=64)
    assert ("WARNING: train.batch_size 64 is larger than the 40 training images: training "
            "with batches of 40 (one step per epoch)") in capsys.readouterr().err
    _, summary = encode_checkpoint(out, load_prepared(data), "cpu")
    assert summary["batch_size"] == 40
    assert summary["notes"] == "train.batch_size 64 clamped to the 40 training images"
    _, fits = encode_checkpoint(run(tmp_path, data, "fits"), load_prepared(data), "cpu")
    assert "notes" not in fits


@pytest.mark.parametrize("method,use", [("byol", "weighted"), ("nnclr", "baseline")])
def test_streamed_feed_trains_exactly_as_the_resident_one(tmp_path, data, neighbours, method,
                                                           use):
    """A training set above train.device_memory_share is streamed from the memory-mapped
    prepared set; the same seed draws the same images in the same order: same weights."""
    nb = neighbours if use != "baseline" else None
    kw = dict(method=method, use=use, nb=nb, batch_size=8)  # five steps an epoch: prefetches
    resident = run(tmp_path, data, "resident", **kw)
    streamed = run(tmp_path, data, "streamed", device_memory_share=1e-12, **kw)
    a = torch.load(resident, weights_only=True)
    b = torch.load(streamed, weights_only=True)
    assert (a["summary"]["feed"], b["summary"]["feed"]) == ("resident", "streamed")
    for name, w in a["encoder"].items():
        assert torch.equal(w, b["encoder"][name]), name
    assert [r["loss"] for r in history(resident)] == [r["loss"] for r in history(streamed)]


def test_streamed_images_read_the_rows_asked_for_in_batch_order(tmp_path, data):
    from pipeline.feed import StreamedImages

    view = load_prepared(data).view("train").images
    images = StreamedImages(view, torch.device("cpu"))
    idx = torch.tensor([7, 3, 39, 3, 0])
    images.prefetch(idx.clone())
    got = images[idx]  # equal indices, another tensor: the prefetched read
    assert torch.equal(got, torch.from_numpy(view[:][idx.numpy()]))
    assert images[idx] is got  # the second anchor view of a step reads nothing
    assert torch.equal(images[torch.tensor([1])], torch.from_numpy(view[1:2]))


def test_device_memory_share_must_be_a_share(tmp_path):
    from pipeline.config import resolve_config

    with pytest.raises(PipelineError, match="train.device_memory_share"):
        resolve_config({"train": {"device_memory_share": 0}})
    with pytest.raises(PipelineError, match="train.device_memory_share"):
        resolve_config({"train": {"device_memory_share": 1.5}})


def test_knn_monitor_is_logged_per_epoch_and_changes_no_weight(tmp_path, data):
    """The per-epoch kNN monitor writes knn_top1 into history.csv (a share of the held
    labelled training images) and draws nothing from the training's random streams."""
    with_monitor = run(tmp_path, data, "monitor")
    without = run(tmp_path, data, "plain", knn_monitor=0)
    assert same_weights(weights(with_monitor), weights(without))
    logged = [float(r["knn_top1"]) for r in history(with_monitor)]
    assert len(logged) == TINY["epochs"] and all(0.0 <= v <= 1.0 for v in logged)
    assert {r["knn_top1"] for r in history(without)} == {""}
    summary = torch.load(with_monitor, weights_only=False)["summary"]
    assert summary["code_version"] != ""


def test_tensorboard_scalars_read_back_per_epoch(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(tmp_path, data, "tb", tensorboard=True)
    events = EventAccumulator(str(out.parent / "tensorboard"))
    events.Reload()
    rows = history(out)
    for key in ("loss", "lr", "knn_top1"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows]
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in rows],
                                                          rel=1e-6)


def test_a_resnet_on_the_cpu_warns_with_the_expected_rate_and_changes_nothing(
        tmp_path, data, capsys, monkeypatch):
    """backbone resnet18_cifar on the CPU: one warning line before training with the
    images/s to expect and the hours; the probe runs on a copy (same weights as without)."""
    out = run(tmp_path, data, "resnet", backbone="resnet18_cifar", epochs=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if "trains at about" in line]
    assert len(lines) == 1
    assert re.search(r"resnet18_cifar on the CPU trains at about \d+ images/s here: this "
                     r"run's 80 images x epochs would take about [\d.]+ h\. On a CPU set "
                     r"train.backbone: smallconv", lines[0])
    monkeypatch.setattr(loop, "_warn_slow_backbone", lambda *a: None)
    again = run(tmp_path, data, "resnet-quiet", backbone="resnet18_cifar", epochs=2)
    assert same_weights(weights(out), weights(again))
