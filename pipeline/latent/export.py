"""Latents of every prepared image from a trained latent model, written with their provenance."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.augment import to_float
from pipeline.device import LAYOUT, describe, resolve_device
from pipeline.io import Prepared, RowView, load_prepared, locate
from pipeline.latent.models import ENCODE_BATCH, AutoDecoder, RidgeStart, build_model
from pipeline.latent.params import LatentParams


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


class _DeviceRows:
    """Images of a :class:`RowView` as uint8 torch tensors on ``device``, a slice at a time:
    what :class:`RidgeStart` indexes, without the training images in memory at once."""

    def __init__(self, view: RowView, device: torch.device):
        self.view, self.device = view, device

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key: slice) -> torch.Tensor:
        return _tensor(self.view[key], self.device)


def _tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    # A memory map's rows are read-only; torch wants a writable array of its own.
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)


def encode(net: torch.nn.Module, state: dict, data: Prepared, device: torch.device
           ) -> np.ndarray:
    """Latent vector of every image of ``data``: (N, dim) float32, in ``data`` order.

    Encoder models map images through the encoder (the VAE its posterior mean). The
    auto-decoder uses its learned code for a training id and infers the code of any other
    image with the decoder frozen. Images are read ``ENCODE_BATCH`` rows at a time (by the
    ridge start's fit, its own batch at a time), so a memory-mapped set is never copied whole.
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
            known_images = RowView(data.images, np.flatnonzero(known))
            start = RidgeStart(_DeviceRows(known_images, device), codes[order])
        for s in range(0, len(todo), ENCODE_BATCH):
            rows = todo[s:s + ENCODE_BATCH]
            x = to_float(_tensor(data.images[rows], device))
            z0 = None if start is None else start(x)
            out[rows] = net.infer(x, p.infer_steps, p.infer_lr, z0).cpu().numpy()
        return out
    with torch.no_grad():
        for s in range(0, len(data.ids), ENCODE_BATCH):
            x = to_float(_tensor(data.images[s:s + ENCODE_BATCH], device))
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
