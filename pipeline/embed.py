"""Embed stage: a trained encoder's frozen features of images, in the latents.parquet schema."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import code_version, load_prepared, write_latents
from pipeline.train.encoder import encode_images, load_encoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_folder(root: str | Path, size: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """Every image file under ``root`` (sorted by path), as uint8 (N, size, size, channels).

    Images are converted to grey (1 channel) or RGB (3) by prepare's rule (16-bit grey scaled,
    EXIF orientation applied, unsupported modes refused) and resized to the encoder's square
    side, as ``prepare`` does for an image folder with ``dataset.resize``.
    """
    from PIL import Image, UnidentifiedImageError

    from pipeline.prepare import to_grey_or_rgb

    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PipelineError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = to_grey_or_rgb(im, str(f)).convert(mode)
                im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im).reshape(size, size, channels)
        except (OSError, UnidentifiedImageError) as e:
            raise PipelineError(f"{f}: cannot read image ({e})") from None
    return out, [str(f.relative_to(root)) for f in files]


def embed_images(encoder: str | Path, images: np.ndarray | str | Path,
                 device: str = "auto") -> np.ndarray:
    """Features of your own images with any ``encoder.pt`` (any method's encoder, no projector).

    Args:
        encoder: an ``encoder.pt`` from ``results/<tag>/train/<run>/seed<N>/``.
        images: uint8 (N, H, W, C) or (N, H, W) at the encoder's size and channels, or a
            folder of image files (read recursively, sorted by path, converted and resized).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.

    Returns:
        (N, D) float32 features, the ones the linear probe and kNN evaluate.
    """
    if isinstance(images, (str, Path)):
        _, ck = load_encoder(encoder, "cpu")
        images, _ = read_folder(images, ck["image_size"], ck["in_channels"])
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise PipelineError(f"images must be uint8 (N, H, W[, C]), got {images.dtype} "
                            f"{images.shape}")
    return encode_images(Path(encoder), images, device)[0]


def embed(encoder: Path, data: Path, out: Path, run: str, dataset: str, device: str) -> None:
    """Write ``features.parquet``: the encoder's features of every prepared image, one row per
    image (id, split, label, latent), with the metadata of ``latents.parquet`` (model = the
    training run), so that whatever reads a latent space reads these features too."""
    start = time.time()
    prepared = load_prepared(data)
    feats, summary = encode_images(encoder, prepared.images, device)
    meta = {
        "model": run,
        "dimension": str(feats.shape[1]),
        "dataset": dataset,
        "params": json.dumps(summary, sort_keys=True, default=str),
        "code_version": code_version(),
        "epochs": str(summary.get("epochs", "")),
        "encoder": str(encoder),
        "export_seconds": str(round(time.time() - start, 2)),
        "image_shape": "x".join(str(s) for s in prepared.images.shape[1:]),
    }
    write_latents(out, prepared, feats, meta)
    print(f"embedded {len(feats)} images into {feats.shape[1]}-d features ({run}) -> {out}",
          file=sys.stderr)
