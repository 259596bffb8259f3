"""Latent stage: shapes, losses against hand computations, the Parquet export, bad input."""

import csv
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import PipelineError
from pipeline.augment import to_float
from pipeline.config import build, latent_params, validate_config
from pipeline.features import latent_features
from pipeline.io import Prepared, load_prepared, save_prepared
from pipeline.latent import LatentParams, encode, export_latents, load_checkpoint, train_latent
from pipeline.latent.collapse import RATIO_MAX, CollapseCheck
from pipeline.latent.models import (
    LATENT_MODELS,
    VAE,
    AutoEncoder,
    RidgeStart,
    build_model,
    kl_divergence,
    level_sizes,
    mse_per_image,
)
from pipeline.prepare import PrepareParams, SyntheticParams, prepare

MODELS = ("autodecoder", "ae", "vae")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny nets: one thread is fastest and leaves the other core to parallel jobs."""


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    # low pixel noise, so that a VAE's loss visibly falls within a few dozen steps
    path = tmp_path_factory.mktemp("data") / "prepared"
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=20, size=8, noise=0.05)), path)
    return path


def fast(**kw) -> LatentParams:
    return LatentParams(**{"dim": 4, "epochs": 3, "batch_size": 16, "width": 8,
                           "infer_steps": 30, **kw})


# enough steps (30 epochs x 6 batches) for every model to learn on the tiny set
LONGER = {"epochs": 30, "batch_size": 8, "lr": 0.005, "code_lr": 0.05}


def train(tmp_path, model, data_path, params=None, name="run"):
    d = tmp_path / name
    train_latent(params or fast(), model, data_path, d / "model.pt", d / "loss.csv",
                 d / "loss.png", d / "recon.png", "cpu")
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_path):
    """Model name -> run folder, each model trained once with ``LONGER`` for the module."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    return {m: train(root, m, data_path, fast(**LONGER), name=m) for m in MODELS}


def read_curve(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("shape", [(8, 8, 1), (12, 12, 1), (28, 28, 1), (32, 32, 3), (96, 96, 3)])
@pytest.mark.parametrize("model", MODELS)
def test_architectures_return_the_exact_input_shape(shape, model):
    torch.manual_seed(0)
    net = build_model(model, shape, dim=5, width=4, n_train=2)
    x = to_float(torch.randint(0, 256, (2, *shape), dtype=torch.uint8))
    assert x.shape == (2, shape[2], shape[0], shape[1]) and 0 <= x.min() and x.max() <= 1
    with torch.no_grad():
        recon = net.reconstruct(x, torch.arange(2))
    assert recon.shape == x.shape
    assert 0 <= recon.min() and recon.max() <= 1
    if model != "autodecoder":
        assert net.represent(x).shape == (2, 5)


def test_levels_halve_until_four():
    assert level_sizes(8, 8) == [(8, 8), (4, 4)]
    assert level_sizes(12, 12) == [(12, 12), (6, 6), (3, 3)]
    assert level_sizes(28, 28) == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert level_sizes(96, 96)[-1] == (3, 3) and len(level_sizes(96, 96)) == 6


def test_kl_matches_hand_computation():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)] = 1 - ln(2) / 2; N(0, I) has KL 0
    kl = kl_divergence(mu, logvar)
    assert kl[0].item() == pytest.approx(1 - math.log(2) / 2, abs=1e-6)
    assert kl[1].item() == 0.0
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl, ref, atol=1e-6)


def test_vae_loss_is_recon_plus_beta_kl():
    torch.manual_seed(0)
    net = VAE((8, 8, 1), dim=3, width=4, beta=0.25)
    x = torch.rand(5, 1, 8, 8)
    total, parts = net.loss(x, torch.arange(5))
    mu, logvar = net.posterior(x)
    assert parts["kl"].item() == pytest.approx(kl_divergence(mu, logvar).mean().item(), rel=1e-6)
    assert total.item() == pytest.approx((parts["recon"] + 0.25 * parts["kl"]).item(), rel=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_loss_falls(trained, model):
    d = trained[model]
    rows = read_curve(d / "loss.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 31))
    extra = {"autodecoder": "prior", "ae": None, "vae": "kl"}[model]
    assert set(rows[0]) == ({"epoch", "loss", "recon", "recon_mse", "recon_ratio", "latent_spread",
                             "seconds"} | ({extra} if extra else set()))
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.9 * first, (first, last)
    assert float(rows[-1]["recon"]) < 0.8 * float(rows[0]["recon"])
    for name in ("loss.png", "recon.png"):
        assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loads_weights_only(trained, data_path):
    state = torch.load(trained["autodecoder"] / "model.pt", weights_only=True)
    data = load_prepared(data_path)
    train_ids = data.ids[data.split == "train"]
    assert state["model"] == "autodecoder" and state["epoch"] == 30
    assert state["image_shape"] == (8, 8, 1)
    assert state["params"] == vars(fast(**LONGER))
    assert state["train_ids"].tolist() == train_ids.tolist()
    assert state["state_dict"]["codes.weight"].shape == (len(train_ids), 4)
    assert "code_version" in state["provenance"]


def test_autodecoder_inference_lowers_reconstruction_error(trained, data_path):
    net, _ = load_checkpoint(trained["autodecoder"] / "model.pt", torch.device("cpu"))
    data = load_prepared(data_path)
    x = to_float(torch.from_numpy(data.images[data.split == "test"]))
    z = net.infer(x, steps=60, lr=0.05)
    with torch.no_grad():
        start = mse_per_image(net.decoder(torch.zeros_like(z)), x).mean().item()
        after = mse_per_image(net.decoder(z), x).mean().item()
    assert after < 0.8 * start, (start, after)
    assert all(p.requires_grad for p in net.decoder.parameters())  # unfrozen afterwards


def test_ridge_start_recovers_a_linear_code_map_and_pools_large_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 4, 4, 1), dtype=torch.uint8, generator=g)
    codes = to_float(images).flatten(1) @ torch.randn(16, 3, generator=g) + 0.5
    start = RidgeStart(images[:150], codes[:150], alpha=1e-9, batch=64)  # chunked sums
    np.testing.assert_allclose(start(to_float(images[150:])), codes[150:], atol=1e-4)
    assert start(to_float(images[:1])).dtype == torch.float32
    # 64x64x3 = 12,288 values: average-pooled to 32x32 per channel before the fit
    assert RidgeStart.features(torch.rand(2, 3, 64, 64)).shape == (2, 3 * 32 * 32)
    assert RidgeStart.features(torch.rand(2, 1, 8, 8)).shape == (2, 64)


def test_autodecoder_export_starts_inference_at_the_ridge_map(trained, data_path):
    net, state = load_checkpoint(trained["autodecoder"] / "model.pt", torch.device("cpu"))
    data = load_prepared(data_path)
    row = {i: r for r, i in enumerate(state["train_ids"].tolist())}
    train = np.array([int(i) in row for i in data.ids])
    codes = net.codes.weight.detach()[[row[int(i)] for i in data.ids[train]]]
    start = RidgeStart(torch.from_numpy(data.images[train]), codes)
    x = to_float(torch.from_numpy(data.images[~train]))
    # with 0 steps the export writes the start itself
    state["params"].update(infer_steps=0, infer_start="ridge")
    np.testing.assert_allclose(encode(net, state, data, torch.device("cpu"))[~train],
                               start(x).numpy(), rtol=1e-5, atol=1e-6)
    state["params"].update(infer_start="zero")
    assert not encode(net, state, data, torch.device("cpu"))[~train].any()
    # from the ridge start, a few steps reconstruct the test images better than from zero

    def mse(z):
        with torch.no_grad():
            return mse_per_image(net.decoder(z), x).mean().item()

    for steps in (0, 5):
        assert mse(net.infer(x, steps, 0.01, start(x))) < mse(net.infer(x, steps, 0.01))


@pytest.mark.parametrize("model", MODELS)
def test_export_reads_the_memory_map_in_batches_with_the_same_latents(trained, data_path, model,
                                                                      monkeypatch):
    """Encoding from the read-only memory map, a few rows at a time (the auto-decoder's ridge
    fit too), gives the latents of the images in memory, with no torch warning."""
    import warnings

    import pipeline.latent.export as export

    cpu = torch.device("cpu")
    net, state = load_checkpoint(trained[model] / "model.pt", cpu)
    state["params"].update(infer_steps=3)
    mapped = load_prepared(data_path)
    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    in_memory = Prepared(np.array(mapped.images), mapped.labels, mapped.split, mapped.ids,
                         mapped.classes)
    expected = encode(net, state, in_memory, cpu)
    monkeypatch.setattr(export, "ENCODE_BATCH", 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = encode(net, state, mapped, cpu)
    np.testing.assert_array_equal(got, expected)


def test_parquet_schema_rows_and_metadata(trained, data_path):
    d = trained["vae"]
    export_latents(d / "model.pt", data_path, d / "latents.parquet", "cpu", "tinyset")
    table = pq.read_table(d / "latents.parquet")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("split").type == pa.string()
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("latent").type == pa.list_(pa.float32(), 4)
    data = load_prepared(data_path)
    assert table.column("id").to_pylist() == data.ids.tolist()
    assert table.column("split").to_pylist() == data.split.tolist()
    assert table.column("label").to_pylist() == data.labels.tolist()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["model"] == "vae" and meta["dimension"] == "4" and meta["dataset"] == "tinyset"
    assert json.loads(meta["params"]) == vars(fast(**LONGER))
    assert meta["epochs"] == "30" and meta["device"].startswith("cpu")
    assert float(meta["train_seconds"]) >= 0 and meta["code_version"]
    # the evaluate stage reads it back aligned by id; the VAE latent is the posterior mean
    feats, meta2 = latent_features(d / "latents.parquet", data)
    net, _ = load_checkpoint(d / "model.pt", torch.device("cpu"))
    with torch.no_grad():
        mean = net.posterior(to_float(torch.from_numpy(np.array(data.images))))[0].numpy()
    np.testing.assert_allclose(feats, mean, rtol=1e-5, atol=1e-6)
    assert meta2 == meta


def test_unlabeled_images_train_and_export(tmp_path, data_path):
    data = load_prepared(data_path)
    unl = np.flatnonzero(data.split == "train")[:10]
    data.split = data.split.astype(object)  # loaded as '<U5': room for "unlabeled"
    data.split[unl] = "unlabeled"
    data.labels[unl] = -1
    save_prepared(tmp_path / "u.npz", data)
    d = train(tmp_path, "autodecoder", tmp_path / "u.npz")
    state = torch.load(d / "model.pt", weights_only=True)
    assert set(data.ids[unl]) <= set(state["train_ids"].tolist())
    export_latents(d / "model.pt", tmp_path / "u.npz", d / "l.parquet", "cpu", "u")
    table = pq.read_table(d / "l.parquet")
    assert table.column("split").to_pylist().count("unlabeled") == 10
    latents = np.asarray(table.column("latent").to_pylist(), dtype=np.float32)
    codes = state["state_dict"]["codes.weight"].numpy()
    row = {i: r for r, i in enumerate(state["train_ids"].tolist())}
    np.testing.assert_array_equal(latents[unl], codes[[row[i] for i in data.ids[unl]]])


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_gives_identical_latents(tmp_path, data_path, model):
    cpu = torch.device("cpu")
    data = load_prepared(data_path)
    out = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        d = train(tmp_path, model, data_path, fast(seed=seed, epochs=2), name=name)
        out.append(encode(*load_checkpoint(d / "model.pt", cpu), data, cpu))
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])


@pytest.mark.parametrize("model", MODELS)
def test_config_params_build(model):
    flat = latent_params(validate_config({}), model)
    p = build(LatentParams, flat)
    assert p.dim == 16 and p.epochs == 30 and p.seed == 0
    assert build_model(model, (8, 8, 1), p.dim, p.width, 3, vars(p)) is not None


def test_bad_input(tmp_path, data_path):
    with pytest.raises(PipelineError,
                       match=r"^config key 'latent.dim': 0 is less than the minimum of 1$"):
        train(tmp_path, "ae", data_path, fast(dim=0))
    with pytest.raises(PipelineError,
                       match=r"^unknown latent model 'pca'; known: autodecoder, ae, vae$"):
        train(tmp_path, "pca", data_path)
    assert set(LATENT_MODELS) == set(MODELS)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_nan_loss_stops_and_writes_nothing(tmp_path, data_path, monkeypatch):
    real = AutoEncoder.loss

    def poisoned(self, x, index):
        loss, parts = real(self, x, index)
        return loss * float("nan"), parts

    monkeypatch.setattr(AutoEncoder, "loss", poisoned)
    with pytest.raises(PipelineError, match=r"^latent model 'ae': loss became nan at epoch 1;"):
        train(tmp_path, "ae", data_path)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_export_rejects_other_image_size(tmp_path, data_path):
    d = train(tmp_path, "ae", data_path)
    other = tmp_path / "other.npz"
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(size=12)), other)
    with pytest.raises(PipelineError, match=r"images are \(12, 12, 1\) \(H, W, C\) but"):
        export_latents(d / "model.pt", other, tmp_path / "x.parquet", "cpu", "x")
    assert not (tmp_path / "x.parquet").exists()


def test_cli_reports_unknown_model_in_one_line(tmp_path, data_path, capsys):
    from pipeline.__main__ import main

    args = ["train-latent", "--model", "pca", "--params", '{"dim": 4}', "--device", "cpu",
            "--data", str(data_path)]
    for name in ("out", "curve", "loss-plot", "recon-plot"):
        args += [f"--{name}", str(tmp_path / name)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown latent model 'pca'; known: autodecoder, ae, vae\n"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- collapse: fix and detection


def dark_shapes(n: int = 256, side: int = 28, seed: int = 0) -> Prepared:
    """Bright discs and bars on black, 28x28 grey: the kind of set the old stack collapsed on
    (mostly-black images: the untrained sigmoid at 0.5 was pushed to black and saturated)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    images, labels = [], []
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * side
        r = rng.uniform(0.15, 0.3) * side
        if i % 2:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r / 2)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        images.append((mask * rng.uniform(150, 255)).astype(np.uint8)[..., None])
        labels.append(i % 2)
    return Prepared(np.stack(images), np.asarray(labels), np.asarray(["train"] * n),
                    np.arange(n), ["disc", "bar"])


@pytest.mark.parametrize("model", MODELS)
def test_trains_below_the_mean_image_on_28px_grey_shapes(tmp_path, model):
    save_prepared(tmp_path / "dark.npz", dark_shapes())
    d = train(tmp_path, model, tmp_path / "dark.npz", LatentParams(dim=4, width=8, epochs=5,
                                                                      batch_size=32))
    health = torch.load(d / "model.pt", weights_only=True)["health"]
    # the stack before the fix: AE and auto-decoder 1.61 (one black image), VAE 1.11
    assert health["recon_ratio"] < 0.8, health
    assert not health["collapsed"] and health["collapse"] == ""
    assert health["mean_image_mse"] == pytest.approx(0.0563, abs=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_healthy_run_is_not_flagged(trained, model, data_path, tmp_path):
    health = torch.load(trained[model] / "model.pt", weights_only=True)["health"]
    assert not health["collapsed"] and health["recon_ratio"] < RATIO_MAX, health
    assert health["latent_spread"] > 0.01
    export_latents(trained[model] / "model.pt", data_path, tmp_path / "l.parquet", "cpu", "t")
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(tmp_path / "l.parquet")
            .metadata.items()}
    assert meta["latent_collapsed"] == "false" and meta["latent_collapse"] == ""
    assert float(meta["recon_ratio"]) == pytest.approx(
        float(meta["recon_mse"]) / float(meta["mean_image_mse"]), rel=1e-4)
    # the latent's results-table row carries them (evaluate copies the export metadata)
    from pipeline.evaluate import EvaluateParams, evaluate

    row = evaluate(EvaluateParams(max_iter=100, knn_k=[5]), f"latent-{model}",
                   tmp_path / "l.parquet", data_path, tmp_path / "e.json", "t")
    assert {"recon_mse", "mean_image_mse", "recon_ratio", "latent_collapsed"} <= set(row)


def test_constant_data_set_is_caught(tmp_path, data_path):
    data = load_prepared(data_path)
    data.images = np.full_like(data.images, 77)  # the loaded images are a read-only map
    save_prepared(tmp_path / "flat.npz", data)
    n = int((data.split == "train").sum())
    for model in MODELS:
        with pytest.raises(PipelineError, match=(
                rf"^latent model '{model}' collapsed at epoch 0: the {n} training images are "
                r"all identical \(mean-image MSE 0\), so no latent can tell them apart; set "
                r"latent.on_collapse: warn to keep such a space$")):
            train(tmp_path, model, tmp_path / "flat.npz", name=model)
        assert not (tmp_path / model).exists() or not any((tmp_path / model).iterdir())


def test_far_too_high_learning_rate_is_caught(tmp_path, data_path):
    with pytest.raises(PipelineError, match=(
            r"^latent model 'ae' collapsed at epoch \d+: .*reconstruction MSE [\d.e-]+ vs the "
            r"mean image's [\d.e-]+ \(ratio [\d.]+\).*; set latent.on_collapse: warn")):
        train(tmp_path, "ae", data_path, fast(lr=10.0, epochs=6))


def test_warn_keeps_a_collapsed_space_and_marks_it(tmp_path, data_path, capsys):
    d = train(tmp_path, "ae", data_path, fast(lr=10.0, epochs=6, on_collapse="warn"))
    err = capsys.readouterr().err
    assert "WARNING: latent model 'ae' collapsed at epoch" in err
    assert len(err.splitlines()) >= 6  # one line per epoch, newline-terminated
    assert all(f"ae epoch {e}/6: loss " in err for e in range(1, 7))
    export_latents(d / "model.pt", data_path, tmp_path / "l.parquet", "cpu", "t")
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(tmp_path / "l.parquet")
            .metadata.items()}
    assert meta["latent_collapsed"] == "true"
    assert meta["latent_collapse"].startswith("latent model 'ae' collapsed at epoch")


@pytest.mark.parametrize("losses, ratios, spreads, epochs, steps, evidence", [
    # issue 12: loss flat to 1e-5 from epoch 2, at the mean image
    ([0.1166, 0.11217, 0.112172, 0.112173], [1.0] * 4, [0.3] * 4, 20, 79,
     "the loss stopped moving (0.11217 -> 0.112173 over epochs 2-4)"),
    ([0.5, 0.4, 0.3], [0.9, 0.5, 0.3], [0.3, 0.3, 1e-9], 3, 100, "(near) zero variance"),
    ([0.5, 0.4, 0.3], [0.9, 1.5, 3.0], [0.3] * 3, 9, 100, "training diverged"),
    ([0.5, 0.4, 0.3], [1.0, 0.99, 0.97], [0.3] * 3, 3, 100, "no better than the mean image"),
])
def test_collapse_check_verdicts(losses, ratios, spreads, epochs, steps, evidence):
    check = CollapseCheck("ae", 0.1, epochs)
    verdicts = [check.update(e + 1, loss, 0.1 * r, s, (e + 1) * steps)
                for e, (loss, r, s) in enumerate(zip(losses, ratios, spreads, strict=True))]
    assert all(v is None for v in verdicts[:-1]), verdicts
    assert verdicts[-1].startswith(f"latent model 'ae' collapsed at epoch {len(losses)}: ")
    assert evidence in verdicts[-1]


def test_collapse_check_passes_healthy_and_short_runs():
    healthy = CollapseCheck("vae", 0.05, 30)
    losses = [0.05 * 0.8 ** e for e in range(30)]
    assert all(healthy.update(e + 1, v, v, 0.5, (e + 1) * 10) is None
               for e, v in enumerate(losses))
    short = CollapseCheck("ae", 0.05, 2)  # 4 steps: too short to judge against the mean image
    assert short.update(1, 0.06, 0.05, 0.5, 2) is None
    assert short.update(2, 0.055, 0.05, 0.5, 4) is None


@pytest.mark.parametrize("model", ["autodecoder", "vae"])
def test_streamed_images_train_the_same_latent_model(tmp_path, data_path, model):
    """Above latent.device_memory_share the training images are read from the prepared
    set as indexed: the same batches, the same weights and codes."""
    resident = torch.load(train(tmp_path, model, data_path, name="resident") / "model.pt",
                          weights_only=True)
    streamed = torch.load(train(tmp_path, model, data_path, fast(device_memory_share=1e-12),
                                name="streamed") / "model.pt", weights_only=True)
    for name, w in resident["state_dict"].items():
        assert torch.equal(w, streamed["state_dict"][name]), name
    assert resident["health"] == streamed["health"]
