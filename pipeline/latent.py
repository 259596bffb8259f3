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
from tqdm import tqdm

from pipeline import PipelineError
from pipeline.config import check_fields
from pipeline.device import describe, resolve_device, seed_everything
from pipeline.io import TRAINING_SPLITS, Prepared, atomic_path, load_prepared, provenance
from pipeline.latent_models import AutoDecoder, build_model, check_model, to_model_input

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
    infer_steps: int = 100
    infer_lr: float = 0.01
    # vae
    beta: float = 1.0


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


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _spread(n: int) -> np.ndarray:
    """Up to RECON_SHOWN positions spread evenly over n: sets sorted by class show several."""
    return np.unique(np.linspace(0, n - 1, min(RECON_SHOWN, n)).round().astype(np.int64))


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
        x = to_model_input(torch.from_numpy(data.images[rows]).to(device))
        recon = model.reconstruct(x, torch.as_tensor(code_rows, device=device))
    recon = recon.permute(0, 2, 3, 1).cpu().numpy()
    image_grid([data.images[rows], recon], path, row_labels=["original", "reconstruction"],
               title=f"{name}: {what}", col_labels=[f"id {i}" for i in data.ids[rows]])


def train_latent(params: LatentParams, model: str, data: Path, out: Path, curve: Path,
                 loss_plot: Path, recon_plot: Path, device: str) -> None:
    """Train latent model ``model`` on the train (and unlabeled) images of ``data``.

    Writes the checkpoint ``out`` (.pt, weights_only-loadable), the per-epoch ``curve`` (CSV),
    ``loss_plot`` and ``recon_plot`` (PNG) — all only after training finished with finite loss.
    """
    check_params(params, model)
    dev = resolve_device(device)
    prepared = load_prepared(data)
    prepared.check()
    rows = _train_rows(prepared)
    gen = seed_everything(params.seed)
    image_shape = tuple(int(s) for s in prepared.images.shape[1:])
    net = build_model(model, image_shape, params.dim, params.width, len(rows),
                      asdict(params)).to(dev)
    code_params = [p for n, p in net.named_parameters() if n.startswith("codes.")]
    net_params = [p for n, p in net.named_parameters() if not n.startswith("codes.")]
    groups = [{"params": net_params, "lr": params.lr}]
    if code_params:
        groups.append({"params": code_params, "lr": params.code_lr})
    opt = torch.optim.Adam(groups)

    # the whole training set lives on the device as uint8; batches are indexed from it
    images = torch.from_numpy(prepared.images[rows]).to(dev)
    n = len(rows)
    steps = math.ceil(n / params.batch_size)
    history: list[dict] = []
    start = time.time()
    # always on (also when stderr is a Snakemake log file), at most one refresh per second
    bar = tqdm(range(1, params.epochs + 1), desc=f"train {model}", file=sys.stderr,
               mininterval=1.0)
    for epoch in bar:
        t0 = time.time()
        order = torch.randperm(n, generator=gen).to(dev)
        totals = torch.zeros(1 + len(net.components), device=dev)
        for s in range(steps):
            index = order[s * params.batch_size:(s + 1) * params.batch_size]
            loss, parts = net.loss(to_model_input(images[index]), index)
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
        history.append({"epoch": epoch, "loss": means[0],
                        **dict(zip(net.components, means[1:], strict=True)),
                        "seconds": round(time.time() - t0, 3)})
        bar.set_postfix(loss=f"{means[0]:.4g}")
    train_seconds = time.time() - start

    net.eval()
    state = {
        "model": model,
        "params": asdict(params),
        "image_shape": image_shape,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "train_ids": torch.from_numpy(prepared.ids[rows].copy()),
        "epoch": params.epochs,
        "history": history,
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
    _save_checkpoint(out, state)  # last: its presence means the stage finished


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
    return net.to(device).eval(), state


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
        position = {int(i): r for r, i in enumerate(state["train_ids"].tolist())}
        known = np.array([int(i) in position for i in data.ids], dtype=bool)
        if known.sum() != len(position):
            raise PipelineError(
                f"prepared data holds {known.sum()} of the {len(position)} images the "
                "auto-decoder was trained on; re-train it on this data set"
            )
        codes = net.codes.weight.detach().cpu().numpy()
        out[known] = codes[[position[int(i)] for i in data.ids[known]]]
        todo = np.flatnonzero(~known)
        for s in range(0, len(todo), ENCODE_BATCH):
            rows = todo[s:s + ENCODE_BATCH]
            x = to_model_input(torch.from_numpy(data.images[rows]).to(device))
            out[rows] = net.infer(x, p.infer_steps, p.infer_lr).cpu().numpy()
        return out
    with torch.no_grad():
        for s in range(0, len(data.ids), ENCODE_BATCH):
            x = to_model_input(torch.from_numpy(data.images[s:s + ENCODE_BATCH]).to(device))
            out[s:s + ENCODE_BATCH] = net.represent(x).cpu().numpy()
    return out


def export_latents(checkpoint: Path, data: Path, out: Path, device: str, dataset: str) -> None:
    """Write ``latents.parquet``: one row per prepared image (id, split, label, latent).

    Schema metadata (bytes): model, dimension, dataset, params (JSON), code_version, epochs,
    train_seconds, device, export_seconds, final_loss, n_train, image_shape.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import code_version

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
    }
    table = pa.table(
        {
            "id": pa.array(prepared.ids.astype(np.int64), pa.int64()),
            "split": pa.array(prepared.split.astype(str).tolist(), pa.string()),
            "label": pa.array(prepared.labels.astype(np.int64), pa.int64()),
            "latent": pa.FixedSizeListArray.from_arrays(pa.array(latents.reshape(-1),
                                                                 pa.float32()), dim),
        }
    ).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    print(
        f"exported {len(prepared.ids)} latents of dim {dim} ({state['model']}) to {out}",
        file=sys.stderr,
    )
