"""Encoder checkpoints of every method: the untrained control, loading, frozen features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.augment import normalise, to_float
from pipeline.backbones import build_backbone, resolve_backbone
from pipeline.io import (
    CHUNK,
    TRAINING_SPLITS,
    Prepared,
    RowView,
    load_prepared,
    provenance,
    save_checkpoint,
)

log = logging.getLogger("pipeline.train")


def channel_stats(images: np.ndarray | RowView, chunk: int = CHUNK,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units of uint8 (N, H, W, C) images, in chunks.

    Chunking keeps a float copy of a large set (STL10's 100k unlabeled images) out of memory;
    a memory map is read ``chunk`` rows at a time.

    Args:
        images: uint8 (N, H, W, C), in memory, memory-mapped or a :class:`RowView`.
        rows: positions of the images to count (all when None), read without copying the rest.
    """
    view = images if rows is None else RowView(images, rows)
    total, sq, count = 0.0, 0.0, 0
    for start in range(0, len(view), chunk):
        x = view[start:start + chunk].astype(np.float64) / 255.0
        total = total + x.sum(axis=(0, 1, 2))
        sq = sq + (x * x).sum(axis=(0, 1, 2))
        count += x[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    return mean, np.maximum(std, 1e-3)


def encoder_header(backbone: str, images: np.ndarray, params: dict, seed: int) -> dict:
    """What every ``encoder.pt`` carries besides the weights: architecture, input size and
    the training set's normalisation, the params and seed, and provenance."""
    _, size, _, channels = images.shape
    mean, std = channel_stats(images)
    return {"backbone": backbone, "in_channels": int(channels), "image_size": int(size),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
            "params": params, "seed": int(seed), "provenance": provenance()}


def init_encoder(backbone: str, seed: int, in_channels: int, size: int) -> nn.Module:
    """The seeded encoder every method starts from; the untrained control is this draw."""
    torch.manual_seed(seed)
    return build_backbone(backbone, in_channels, size)


def write_untrained(backbone: str, seed: int, data: Path, out: Path) -> None:
    """Write the seeded random initialisation of the encoder: the control row.

    The draw is the one every method's run with the same seed and backbone starts from
    (:func:`init_encoder`).

    Args:
        backbone: ``train.backbone`` (``auto`` resolved by the image side).
        seed: the run's seed.
        data: the prepared folder; its training images fix channels, size and statistics.
        out: ``encoder.pt`` to write.
    """
    train = load_prepared(data).view(*TRAINING_SPLITS)  # images read a chunk at a time
    if len(train.images) == 0:
        raise PipelineError(f"{data}: no training images for the untrained encoder")
    _, size, width, channels = train.images.shape
    backbone = resolve_backbone(backbone, min(size, width))
    encoder = init_encoder(backbone, seed, channels, size)
    summary = {"epochs": 0, "train_seconds": 0.0, "device": "none", "backbone": backbone,
               "collapsed": False}
    save_checkpoint({**encoder_header(backbone, train.images, {"backbone": backbone}, seed),
                     "columns": {"stage": "untrained"}, "encoder": encoder.state_dict(),
                     "summary": summary}, Path(out))
    log.info("wrote untrained %s encoder to %s", backbone, out)


def load_encoder(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Encoder module (eval mode, on ``device``) and the checkpoint dict from ``encoder.pt``."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"encoder checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    encoder = build_backbone(ck["backbone"], ck["in_channels"], ck["image_size"])
    encoder.load_state_dict(ck["encoder"])
    return encoder.to(device).eval(), ck


@torch.no_grad()
def encode_images(
    path: Path, images: np.ndarray | RowView, device: str, batch_size: int = 1024,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Frozen features of uint8 images (N, H, W, C), and the run's flat summary.

    The images are read ``batch_size`` rows at a time, so a memory map (or a
    :class:`RowView` of one) is never copied whole.

    Args:
        path: ``encoder.pt`` written by ``pipeline.train.train`` or :func:`write_untrained`.
        images: uint8 (N, H, W, C); must match the checkpoint's channels and size.
        device: where to run the encoder.
        rows: positions of the images to encode, in this order (all when None).

    Returns:
        features (N, D) float32 (encoder output, no projector, no augmentation; one row per
        image of ``rows``) and a dict of scalars/strings (the run's columns: stage, method,
        variant, source, ...; epochs, train_seconds, device, final_loss, backbone, ...).
    """
    from pipeline.device import LAYOUT, resolve_device

    dev = resolve_device(device)
    encoder, ck = load_encoder(path, str(dev))
    encoder.to(memory_format=LAYOUT)
    view = images if rows is None else RowView(images, rows)
    _, h, _, c = view.shape
    if c != ck["in_channels"] or h != ck["image_size"]:
        raise PipelineError(f"{path} was trained on {ck['image_size']} px images with "
                            f"{ck['in_channels']} channels; the data has {h} px, {c} channels")
    mean, std = ck["mean"].to(dev), ck["std"].to(dev)
    feats = np.zeros((len(view), encoder.out_dim), np.float32)
    for start in range(0, len(view), batch_size):
        # A memory map's rows are read-only; torch wants a writable array of its own.
        block = np.require(view[start:start + batch_size], requirements=["C", "W"])
        x = torch.from_numpy(block).to(dev)
        x = normalise(to_float(x), mean, std).contiguous(memory_format=LAYOUT)
        feats[start:start + len(block)] = encoder(x).float().cpu().numpy()
    summary = {k: v for k, v in ck["summary"].items() if isinstance(v, (int, float, str, bool))}
    summary.update(backbone=ck["backbone"], **ck["columns"])
    return feats, summary


def encode_checkpoint(
    path: Path, data: Prepared, device: str, batch_size: int = 1024,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """:func:`encode_images` of the images of a prepared data set (its rows ``rows``, all when
    None), in ``data`` order, read from its memory map a batch at a time."""
    return encode_images(path, data.images, device, batch_size, rows)
