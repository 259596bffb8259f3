"""Latent stage's training: an auto-decoder, auto-encoder or VAE on the training images."""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.augment import to_float
from pipeline.device import LAYOUT, describe, resolve_device, seed_everything
from pipeline.feed import feed
from pipeline.io import (
    TRAINING_SPLITS,
    Prepared,
    atomic_path,
    load_prepared,
    provenance,
    save_checkpoint,
)
from pipeline.latent.collapse import MIN_STEPS, CollapseCheck
from pipeline.latent.health import (
    PROBE_IMAGES,
    final_health,
    mean_image,
    probe,
    reference_mse,
    spread,
)
from pipeline.latent.models import AutoDecoder, build_model
from pipeline.latent.params import LatentParams, check_params

RECON_SHOWN = 10


def train_latent(params: LatentParams, model: str, data: Path, out: Path, curve: Path,
                 loss_plot: Path, recon_plot: Path, device: str) -> None:
    """Train latent model ``model`` on the train (and unlabeled) images of ``data``.

    Writes the checkpoint ``out`` (.pt, weights_only-loadable), the per-epoch ``curve`` (CSV),
    ``loss_plot`` and ``recon_plot`` (PNG) — all only after training finished with finite loss
    and, unless ``params.on_collapse`` is ``warn``, without collapse (see
    :mod:`pipeline.latent.health`). Logs one line per epoch to stderr.
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
    # uint8 training images on the device, batches indexed from them; above
    # latent.device_memory_share of its memory, read from the prepared set as indexed
    images = feed(prepared.view(*TRAINING_SPLITS).images, params.device_memory_share, dev,
                  "latent.device_memory_share",
                  lambda line: print(f"{model}: {line}", file=sys.stderr))
    mean = mean_image(images)
    net.decoder.start_at_mean(mean.mean((1, 2)))
    opt = _optimiser(net, params.lr, params.code_lr)
    history, collapse, train_seconds = _fit(net, opt, images, mean, gen, model, params)
    health = final_health(net, images, mean, model, params.dim, collapse)
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
    _write_figures(net, model, history, prepared, rows, dev, loss_plot, recon_plot)
    _write_curve(curve, history)
    save_checkpoint(state, out)  # last: its presence means the stage finished


def _optimiser(net: torch.nn.Module, lr: float, code_lr: float) -> torch.optim.Adam:
    """Adam over the network at ``lr`` and, for the auto-decoder, over its codes at ``code_lr``."""
    code_params = [p for n, p in net.named_parameters() if n.startswith("codes.")]
    net_params = [p for n, p in net.named_parameters() if not n.startswith("codes.")]
    groups = [{"params": net_params, "lr": lr}]
    if code_params:
        groups.append({"params": code_params, "lr": code_lr})
    return torch.optim.Adam(groups)


def _fit(net: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
         mean: torch.Tensor, gen: torch.Generator, model: str, params: LatentParams
         ) -> tuple[list[dict], str, float]:
    """Train for ``params.epochs`` epochs, probing the model and judging collapse after each.

    Args:
        images: uint8 (N, H, W, C) training images on the model's device; mean: their mean
            image (C, H, W); gen: the generator of the epochs' orders.

    Returns:
        The per-epoch history (the curve's rows), the collapse verdict ("" when none) and the
        seconds the epochs took.
    """
    n, dev = len(images), images.device
    probe_rows = torch.as_tensor(_spread(n, PROBE_IMAGES), device=dev)
    check = CollapseCheck(model, reference_mse(images, probe_rows, mean), params.epochs)
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
        means = _epoch(net, opt, images, order, params.batch_size, steps)
        if not all(math.isfinite(v) for v in means):
            raise PipelineError(
                f"latent model {model!r}: loss became {means[0]} at epoch {epoch}; "
                "lower latent.lr or check the data"
            )
        seconds = time.time() - t0
        recon_mse, z = probe(net, images, probe_rows)
        z_spread = spread(z)
        history.append({"epoch": epoch, "loss": means[0],
                        **dict(zip(net.components, means[1:], strict=True)),
                        "recon_mse": recon_mse, "recon_ratio": check.ratio(recon_mse),
                        "latent_spread": z_spread, "seconds": round(seconds, 3)})
        eta = (time.time() - start) / epoch * (params.epochs - epoch)
        _log_epoch(model, params.epochs, history[-1], net.components, opt,
                   n / max(seconds, 1e-9), eta)
        verdict = None if collapse else check.update(epoch, means[0], recon_mse, z_spread,
                                                     epoch * steps)
        if verdict:
            collapse = verdict
            _on_collapse(verdict, params.on_collapse)
    if check.epochs * steps < MIN_STEPS and not collapse:
        print(f"note: {params.epochs * steps} optimiser steps are fewer than {MIN_STEPS}: too "
              "few to judge the reconstruction against the mean image", file=sys.stderr)
    return history, collapse, time.time() - start


def _epoch(net: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
           order: torch.Tensor, batch_size: int, steps: int) -> list[float]:
    """One pass over ``images`` in ``order``: the mean loss and its components, per image."""
    totals = torch.zeros(1 + len(net.components), device=images.device)
    for s in range(steps):
        index = order[s * batch_size:(s + 1) * batch_size]
        loss, parts = net.loss(to_float(images[index]), index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # summed on the device; one host sync per epoch, not per step
        totals += len(index) * torch.stack([loss.detach()] +
                                           [parts[c].detach() for c in net.components])
    return (totals / len(order)).tolist()


def _log_epoch(model: str, epochs: int, row: dict, components: tuple[str, ...],
               opt: torch.optim.Optimizer, rate: float, eta: float) -> None:
    """One line on stderr for one epoch's ``row`` of the history (``rate`` in images/s)."""
    lrs = "/".join(f"{g['lr']:g}" for g in opt.param_groups)
    parts_text = ", ".join(f"{c} {row[c]:.5g}" for c in components)
    print(f"{model} epoch {row['epoch']}/{epochs}: loss {row['loss']:.6g} ({parts_text}), "
          f"recon MSE {row['recon_mse']:.4g} = {row['recon_ratio']:.3f} x mean image, "
          f"latent spread {row['latent_spread']:.3g}, lr {lrs}, {rate:.0f} img/s, "
          f"ETA {_clock(eta)}",
          file=sys.stderr, flush=True)


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


def _write_figures(net: torch.nn.Module, model: str, history: list[dict], data: Prepared,
                   train_rows: np.ndarray, device: torch.device, loss_plot: Path,
                   recon_plot: Path) -> None:
    """The loss curves (each component too, where there are several) and the reconstructions."""
    from pipeline.plots import loss_curves

    series = {"total": [h["loss"] for h in history]}
    series.update({c: [h[c] for h in history] for c in net.components if len(net.components) > 1})
    positive = all(v > 0 for vals in series.values() for v in vals)
    loss_curves(series, loss_plot, title=f"{model} training loss", log_y=positive)
    _recon_figure(net, model, data, train_rows, device, recon_plot)
