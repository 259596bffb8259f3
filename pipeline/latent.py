"""Latent stage: train an auto-decoder, auto-encoder or VAE on the images; export latents."""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.augment import to_float
from pipeline.config import check_fields
from pipeline.device import LAYOUT, describe, resolve_device, seed_everything
from pipeline.io import (
    TRAINING_SPLITS,
    Prepared,
    atomic_path,
    load_prepared,
    locate,
    provenance,
    save_checkpoint,
)
from pipeline.latent_health import (
    MIN_STEPS,
    PROBE_IMAGES,
    CollapseCheck,
    effective_dim,
    mean_image,
    spread,
)
from pipeline.latent_models import (
    AutoDecoder,
    RidgeStart,
    build_model,
    check_model,
)

ENCODE_BATCH = 1024
RECON_SHOWN = 10


@dataclass
class LatentParams:
    dim: int = 16
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.002
    width: int = 32
    seed: int = 0
    # autodecoder
    prior_weight: float = 1e-4
    code_lr: float = 0.01
    code_init_std: float = 0.01
    infer_steps: int = 20
    infer_lr: float = 0.01
    infer_start: str = "ridge"
    # vae
    beta: float = 1.0
    # runtime only (not a cache key): what a detected collapse does
    on_collapse: str = "error"


def check_params(p: LatentParams, model: str) -> None:
    """Raise PipelineError for an unknown model or a value outside the schema's range."""
    check_model(model)
    check_fields(p)


def _train_rows(data: Prepared) -> np.ndarray:
    rows = np.flatnonzero(np.isin(data.split, TRAINING_SPLITS))
    if len(rows) == 0:
        raise PipelineError("prepared data set has no 'train' images to learn a latent space on")
    return rows


def _write_curve(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _spread(n: int, count: int = RECON_SHOWN) -> np.ndarray:
    """Up to ``count`` positions spread evenly over n: sets sorted by class show several."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def _recon_figure(model: torch.nn.Module, name: str, data: Prepared, train_rows: np.ndarray,
                  device: torch.device, path: Path) -> None:
    """Originals above reconstructions: test images for encoders, train images (learned codes)
    for the auto-decoder, whose test codes only exist after export's inference."""
    from pipeline.plots import image_grid

    if isinstance(model, AutoDecoder) or not (data.split == "test").any():
        code_rows = _spread(len(train_rows))
        rows, what = train_rows[code_rows], "train images (learned codes)"
    else:
        test_rows = np.flatnonzero(data.split == "test")
        rows, what = test_rows[_spread(len(test_rows))], "test images"
        code_rows = np.zeros(len(rows), dtype=np.int64)  # unused by encoder models
    with torch.no_grad():
        x = to_float(torch.from_numpy(data.images[rows]).to(device))
        recon = model.reconstruct(x, torch.as_tensor(code_rows, device=device))
    recon = recon.permute(0, 2, 3, 1).cpu().numpy()
    image_grid([data.images[rows], recon], path, row_labels=["original", "reconstruction"],
               title=f"{name}: {what}", col_labels=[f"id {i}" for i in data.ids[rows]])


def _latent_of(net: torch.nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The representation of training images ``x`` at code rows ``index``: (N, dim)."""
    return net.codes(index) if isinstance(net, AutoDecoder) else net.represent(x)


@torch.no_grad()
def _reference_mse(images: torch.Tensor, positions: torch.Tensor, mean: torch.Tensor) -> float:
    """MSE of the images at ``positions`` to the training mean image (C, H, W): the error of
    a model that draws the same image for every input. Computed once per run."""
    total = 0.0
    for s in range(0, len(positions), ENCODE_BATCH):
        x = to_float(images[positions[s:s + ENCODE_BATCH]])
        total += (x - mean).pow(2).sum().item()
    return total / (len(positions) * mean.numel())


@torch.no_grad()
def _probe(net: torch.nn.Module, images: torch.Tensor, positions: torch.Tensor
           ) -> tuple[float, torch.Tensor]:
    """Reconstruction MSE (model in eval mode) and latents (N, dim) of training images."""
    was_training = net.training
    net.eval()
    total, latents = 0.0, []
    for s in range(0, len(positions), ENCODE_BATCH):
        index = positions[s:s + ENCODE_BATCH]
        x = to_float(images[index])
        total += (net.reconstruct(x, index) - x).pow(2).sum().item()
        latents.append(_latent_of(net, x, index))
    net.train(was_training)
    return total / (len(positions) * images[0].numel()), torch.cat(latents)


def _on_collapse(verdict: str, policy: str) -> None:
    """Stop the job with the verdict, or, where the config opted in, print it loudly."""
    if policy == "error":
        raise PipelineError(f"{verdict}; set latent.on_collapse: warn to keep such a space")
    bar = "!" * 78
    print(f"{bar}\nWARNING: {verdict}; kept because latent.on_collapse is warn: its "
          f"neighbours will be poor positives\n{bar}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def train_latent(params: LatentParams, model: str, data: Path, out: Path, curve: Path,
                 loss_plot: Path, recon_plot: Path, device: str) -> None:
    """Train latent model ``model`` on the train (and unlabeled) images of ``data``.

    Writes the checkpoint ``out`` (.pt, weights_only-loadable), the per-epoch ``curve`` (CSV),
    ``loss_plot`` and ``recon_plot`` (PNG) — all only after training finished with finite loss
    and, unless ``params.on_collapse`` is ``warn``, without collapse (see
    :mod:`pipeline.latent_health`). Logs one line per epoch to stderr.
    """
    check_params(params, model)
    dev = resolve_device(device)
    prepared = load_prepared(data)
    prepared.check()
    rows = _train_rows(prepared)
    gen = seed_everything(params.seed)
    image_shape = tuple(int(s) for s in prepared.images.shape[1:])
    net = build_model(model, image_shape, params.dim, params.width, len(rows),
                      asdict(params)).to(dev, memory_format=LAYOUT)
    # the whole training set lives on the device as uint8; batches are indexed from it
    images = torch.from_numpy(prepared.images[rows]).to(dev)
    n = len(rows)
    mean = mean_image(images)
    net.decoder.start_at_mean(mean.mean((1, 2)))
    code_params = [p for n, p in net.named_parameters() if n.startswith("codes.")]
    net_params = [p for n, p in net.named_parameters() if not n.startswith("codes.")]
    groups = [{"params": net_params, "lr": params.lr}]
    if code_params:
        groups.append({"params": code_params, "lr": params.code_lr})
    opt = torch.optim.Adam(groups)

    probe = torch.as_tensor(_spread(n, PROBE_IMAGES), device=dev)
    check = CollapseCheck(model, _reference_mse(images, probe, mean), params.epochs)
    collapse = ""
    if check.mean_image_mse == 0:
        collapse = (f"latent model {model!r} collapsed at epoch 0: the {n} training images "
                    "are all identical (mean-image MSE 0), so no latent can tell them apart")
        _on_collapse(collapse, params.on_collapse)
    steps = math.ceil(n / params.batch_size)
    history: list[dict] = []
    start = time.time()
    for epoch in range(1, params.epochs + 1):
        t0 = time.time()
        order = torch.randperm(n, generator=gen).to(dev)
        totals = torch.zeros(1 + len(net.components), device=dev)
        for s in range(steps):
            index = order[s * params.batch_size:(s + 1) * params.batch_size]
            loss, parts = net.loss(to_float(images[index]), index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # summed on the device; one host sync per epoch, not per step
            totals += len(index) * torch.stack([loss.detach()] +
                                               [parts[c].detach() for c in net.components])
        means = (totals / n).tolist()
        if not all(math.isfinite(v) for v in means):
            raise PipelineError(
                f"latent model {model!r}: loss became {means[0]} at epoch {epoch}; "
                "lower latent.lr or check the data"
            )
        seconds = time.time() - t0
        recon_mse, z = _probe(net, images, probe)
        z_spread = spread(z)
        history.append({"epoch": epoch, "loss": means[0],
                        **dict(zip(net.components, means[1:], strict=True)),
                        "recon_mse": recon_mse, "recon_ratio": check.ratio(recon_mse),
                        "latent_spread": z_spread, "seconds": round(seconds, 3)})
        elapsed = time.time() - start
        lrs = "/".join(f"{g['lr']:g}" for g in opt.param_groups)
        parts_text = ", ".join(f"{c} {v:.5g}" for c, v in zip(net.components, means[1:],
                                                               strict=True))
        print(f"{model} epoch {epoch}/{params.epochs}: loss {means[0]:.6g} ({parts_text}), "
              f"recon MSE {recon_mse:.4g} = {check.ratio(recon_mse):.3f} x mean image, "
              f"latent spread {z_spread:.3g}, lr {lrs}, {n / max(seconds, 1e-9):.0f} img/s, "
              f"ETA {_clock(elapsed / epoch * (params.epochs - epoch))}",
              file=sys.stderr, flush=True)
        verdict = None if collapse else check.update(epoch, means[0], recon_mse, z_spread,
                                                     epoch * steps)
        if verdict:
            collapse = verdict
            _on_collapse(verdict, params.on_collapse)
    if check.epochs * steps < MIN_STEPS and not collapse:
        print(f"note: {params.epochs * steps} optimiser steps are fewer than {MIN_STEPS}: too "
              "few to judge the reconstruction against the mean image", file=sys.stderr)
    train_seconds = time.time() - start

    net.eval()
    all_rows = torch.arange(n, device=dev)
    recon_mse, z = _probe(net, images, all_rows)
    reference = _reference_mse(images, all_rows, mean)
    health = {"recon_mse": recon_mse, "mean_image_mse": reference,
              "recon_ratio": CollapseCheck(model, reference, 0).ratio(recon_mse),
              "latent_spread": spread(z), "latent_effective_dim": effective_dim(z),
              "collapsed": bool(collapse), "collapse": collapse}
    print(f"{model}: training images' reconstruction MSE {recon_mse:.4g}, mean image's "
          f"{reference:.4g} (ratio {health['recon_ratio']:.3f}), latent spread "
          f"{health['latent_spread']:.3g}, effective dimension "
          f"{health['latent_effective_dim']:.2f} of {params.dim}", file=sys.stderr)
    state = {
        "model": model,
        "params": asdict(params),
        "image_shape": image_shape,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "train_ids": torch.from_numpy(prepared.ids[rows].copy()),
        "epoch": params.epochs,
        "history": history,
        "health": health,
        "train_seconds": round(train_seconds, 2),
        "device": describe(dev),
        "data": str(data),
        "provenance": provenance(),
    }
    from pipeline.plots import loss_curves

    series = {"total": [h["loss"] for h in history]}
    series.update({c: [h[c] for h in history] for c in net.components if len(net.components) > 1})
    positive = all(v > 0 for vals in series.values() for v in vals)
    loss_curves(series, loss_plot, title=f"{model} training loss", log_y=positive)
    _recon_figure(net, model, prepared, rows, dev, recon_plot)
    _write_curve(curve, history)
    save_checkpoint(state, out)  # last: its presence means the stage finished


def load_checkpoint(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved by :func:`train_latent`; returns (model in eval mode, state)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"latent checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    p = LatentParams(**state["params"])
    net = build_model(state["model"], state["image_shape"], p.dim, p.width,
                      len(state["train_ids"]), asdict(p))
    net.load_state_dict(state["state_dict"])
    return net.to(device, memory_format=LAYOUT).eval(), state


def encode(net: torch.nn.Module, state: dict, data: Prepared, device: torch.device
           ) -> np.ndarray:
    """Latent vector of every image of ``data``: (N, dim) float32, in ``data`` order.

    Encoder models map images through the encoder (the VAE its posterior mean). The
    auto-decoder uses its learned code for a training id and infers the code of any other
    image with the decoder frozen.
    """
    p = LatentParams(**state["params"])
    out = np.zeros((len(data.ids), p.dim), dtype=np.float32)
    if isinstance(net, AutoDecoder):
        train_ids = state["train_ids"].numpy()
        position, known = locate(train_ids, data.ids)
        if known.sum() != len(train_ids):
            raise PipelineError(
                f"prepared data holds {known.sum()} of the {len(train_ids)} images the "
                "auto-decoder was trained on; re-train it on this data set"
            )
        codes = net.codes.weight.detach()
        order = position[known]
        out[known] = codes.cpu().numpy()[order]
        todo = np.flatnonzero(~known)
        start = None
        if len(todo) and p.infer_start == "ridge":
            start = RidgeStart(torch.from_numpy(data.images[known]).to(device), codes[order])
        for s in range(0, len(todo), ENCODE_BATCH):
            rows = todo[s:s + ENCODE_BATCH]
            x = to_float(torch.from_numpy(data.images[rows]).to(device))
            z0 = None if start is None else start(x)
            out[rows] = net.infer(x, p.infer_steps, p.infer_lr, z0).cpu().numpy()
        return out
    with torch.no_grad():
        for s in range(0, len(data.ids), ENCODE_BATCH):
            x = to_float(torch.from_numpy(data.images[s:s + ENCODE_BATCH]).to(device))
            out[s:s + ENCODE_BATCH] = net.represent(x).cpu().numpy()
    return out


def _health_metadata(health: dict | None) -> dict[str, str]:
    """Training-set reconstruction error against the mean image, latent spread and collapse
    verdict, as metadata strings; evaluate copies them into the latent's results-table row."""
    if not health:  # a checkpoint written before these were recorded
        return {}
    out = {k: f"{health[k]:.6g}" for k in ("recon_mse", "mean_image_mse", "recon_ratio",
                                            "latent_spread", "latent_effective_dim")}
    out["latent_collapsed"] = str(bool(health["collapsed"])).lower()
    out["latent_collapse"] = health["collapse"]
    return out


def export_latents(checkpoint: Path, data: Path, out: Path, device: str, dataset: str) -> None:
    """Write ``latents.parquet``: one row per prepared image (id, split, label, latent).

    Schema metadata (bytes): model, dimension, dataset, params (JSON), code_version, epochs,
    train_seconds, device, export_seconds, final_loss, n_train, image_shape, and the training
    health: recon_mse, mean_image_mse, recon_ratio, latent_spread, latent_effective_dim,
    latent_collapsed (true/false), latent_collapse (the verdict, empty when none).
    """
    from pipeline.io import code_version, write_latents

    start = time.time()
    dev = resolve_device(device)
    net, state = load_checkpoint(checkpoint, dev)
    prepared = load_prepared(data)
    prepared.check()
    shape = tuple(int(s) for s in prepared.images.shape[1:])
    if shape != tuple(state["image_shape"]):
        raise PipelineError(
            f"{data}: images are {shape} (H, W, C) but {checkpoint} was trained on "
            f"{tuple(state['image_shape'])}"
        )
    latents = encode(net, state, prepared, dev)
    if not np.isfinite(latents).all():
        raise PipelineError(f"{checkpoint}: latents contain NaN or infinite values")
    dim = latents.shape[1]
    history = state.get("history") or [{}]
    meta = {
        "model": state["model"],
        "dimension": str(dim),
        "dataset": dataset,
        "params": json.dumps(state["params"], sort_keys=True),
        "code_version": code_version(),
        "epochs": str(state["epoch"]),
        "train_seconds": str(state.get("train_seconds", "")),
        "device": state.get("device", ""),
        "export_device": describe(dev),
        "export_seconds": str(round(time.time() - start, 2)),
        "final_loss": str(history[-1].get("loss", "")),
        "n_train": str(len(state["train_ids"])),
        "image_shape": "x".join(str(s) for s in shape),
        **_health_metadata(state.get("health")),
    }
    write_latents(out, prepared, latents, meta)
    print(
        f"exported {len(prepared.ids)} latents of dim {dim} ({state['model']}) to {out}",
        file=sys.stderr,
    )
