"""Batched per-sample image augmentations (every method's two views) on the data's device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601 luma weights, as torchvision uses for rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(kw_only=True)
class AugmentParams:
    """One view's augmentation. Blur and solarisation have no default here: BYOL's two views
    differ in exactly these (``ByolParams.view1`` / ``view2`` hold the paper's values)."""

    blur_prob: float
    solarize_prob: float
    crop_min_scale: float = 0.3
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: float = 0.4
    grayscale_prob: float = 0.2


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a batch of ``total`` images: one training process's part of
    the global batch (:mod:`pipeline.train.distributed`). Every per-sample number is drawn
    for all ``total`` rows and the shard's are kept, so a process builds exactly the rows
    that a single process builds of the whole batch."""

    start: int
    stop: int
    total: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def rand(n: int, g: torch.Generator, device, shard: Shard | None = None) -> torch.Tensor:
    """``n`` uniforms in [0, 1) from ``g``, on ``device``. They are drawn where the generator
    lives and moved: the training loop's generators are CPU ones, so the same seed draws the
    same crops, flips and coins for images on the CPU and on CUDA (a few bytes per image
    cross to the device; the pixels never leave it). With a ``shard``, the ``n`` rows are
    that shard of a batch of ``shard.total``: all are drawn, the shard's returned."""
    if shard is None:
        return torch.rand(n, generator=g, device=g.device).to(device)
    return torch.rand(shard.total, generator=g, device=g.device)[shard.rows].to(device)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device,
             shard: Shard | None) -> torch.Tensor:
    return lo + (hi - lo) * rand(n, g, device, shard)


def _coin(n: int, p: float, g: torch.Generator, device, shard: Shard | None) -> torch.Tensor:
    return rand(n, g, device, shard) < p


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma (identity for one channel)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def crop_flip(
    x: torch.Tensor, min_scale: float, flip_prob: float, g: torch.Generator,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Random resized crop plus horizontal flip, one affine warp per sample.

    Each sample gets an area fraction in [min_scale, 1], an aspect ratio in [3/4, 4/3] and a
    uniformly placed window inside the image; the flip negates the x scale of the same warp, so
    crop and flip cost one ``grid_sample``.

    Args:
        x: (B, C, H, W) float images.
        min_scale: smallest crop area fraction.
        flip_prob: probability of a horizontal flip.
        g: generator (on the CPU or on ``x.device``).
        shard: ``x`` is this shard of a larger batch (see :func:`rand`); None: the batch.

    Returns:
        (B, C, H, W) warped images, bilinear, borders replicated.
    """
    b, dev = x.shape[0], x.device
    area = _uniform(b, min_scale, 1.0, g, dev, shard)
    log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), g, dev, shard)
    # A window of area a fits inside the image only if |log ratio| <= -log a; clamping there
    # (instead of rejection sampling as torchvision does) keeps one draw per sample.
    bound = -torch.log(area)
    ratio = torch.exp(torch.maximum(torch.minimum(log_ratio, bound), -bound))
    # Window side lengths as fractions of the image (affine_grid works in [-1, 1] units).
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * rand(b, g, dev, shard) - 1) * (1 - sw)
    cy = (2 * rand(b, g, dev, shard) - 1) * (1 - sh)
    flip = _coin(b, flip_prob, g, dev, shard)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(flip, -sw, sw)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    m = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    return torch.einsum("ij,bjhw->bihw", m, x)


def _yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    m = x.new_tensor([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
    return torch.einsum("ij,bjhw->bihw", m, x)


def colour_jitter(
    x: torch.Tensor, prob: float, strength: float, g: torch.Generator,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter, applied with ``prob``.

    Factors are drawn from [1 - s, 1 + s]; the hue shift from [-s/4, s/4] of a full turn
    (a rotation of the chroma plane in YIQ: one batched matrix product, no HSV round trip).
    One-channel images only get brightness and contrast.

    Args:
        x: (B, C, H, W) float images in [0, 1], C in {1, 3}.

    Returns:
        (B, C, H, W) images in [0, 1].
    """
    b, dev = x.shape[0], x.device
    apply = _coin(b, prob, g, dev, shard).view(b, 1, 1, 1)
    s = strength
    bright = _uniform(b, max(0.0, 1 - s), 1 + s, g, dev, shard).view(b, 1, 1, 1)
    contrast = _uniform(b, max(0.0, 1 - s), 1 + s, g, dev, shard).view(b, 1, 1, 1)
    out = (x * bright).clamp(0, 1)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (mean + contrast * (out - mean)).clamp(0, 1)
    if x.shape[1] == 3:
        sat = _uniform(b, max(0.0, 1 - s), 1 + s, g, dev, shard).view(b, 1, 1, 1)
        hue = _uniform(b, -s / 4, s / 4, g, dev, shard) * 2 * math.pi
        grey = _grey(out)
        out = (grey + sat * (out - grey)).clamp(0, 1)
        yiq = _rgb_to_yiq(out)
        cos, sin = torch.cos(hue).view(b, 1, 1), torch.sin(hue).view(b, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
        out = _yiq_to_rgb(yiq).clamp(0, 1)
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, prob: float, g: torch.Generator,
                     shard: Shard | None = None) -> torch.Tensor:
    """Replace colour images by their luma (kept 3-channel) with ``prob``; grey input unchanged."""
    if x.shape[1] != 3:
        return x
    apply = _coin(x.shape[0], prob, g, x.device, shard).view(-1, 1, 1, 1)
    return torch.where(apply, _grey(x).expand_as(x), x)


def gaussian_blur(
    x: torch.Tensor, prob: float, g: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0),
    shard: Shard | None = None,
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, applied with ``prob``.

    The kernel spans about a tenth of the image side (odd, at least 3), as in SimCLR/BYOL;
    sigma is in pixels of a 224-px image scaled to this image's side.
    """
    b, c, h, w = x.shape
    dev = x.device
    apply = _coin(b, prob, g, dev, shard).view(b, 1, 1, 1)
    scale = min(h, w) / 224.0
    s = _uniform(b, sigma[0], sigma[1], g, dev, shard) * max(scale, 0.25)
    size = max(3, int(0.1 * min(h, w)) | 1)
    r = torch.arange(size, device=dev, dtype=x.dtype) - size // 2
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * s.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, size)
    flat = x.reshape(1, b * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="replicate"), k.view(b * c, 1, 1, size),
                    groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="replicate"), k.view(b * c, 1, size, 1),
                    groups=b * c)
    return torch.where(apply, flat.view(b, c, h, w), x)


def solarize(x: torch.Tensor, prob: float, g: torch.Generator, threshold: float = 0.5,
             shard: Shard | None = None):
    """Invert pixels above ``threshold`` with ``prob`` per sample."""
    apply = _coin(x.shape[0], prob, g, x.device, shard).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def augment(x: torch.Tensor, p: AugmentParams, g: torch.Generator,
            shard: Shard | None = None) -> torch.Tensor:
    """One view of every image: crop+flip, colour jitter, grey, blur, solarise.

    Every random choice is per sample and drawn from ``g`` (see :func:`rand`), so the same
    generator state gives the same views. Steps whose probability is zero draw
    nothing, so switching them on changes the stream but switching nothing keeps it.

    Args:
        x: (B, C, H, W) float images in [0, 1], C in {1, 3}.
        p: augmentation parameters.
        g: generator on the CPU (the same draws on every device) or on ``x.device``.
        shard: ``x`` holds only this shard's rows of the batch; its views are exactly those
            rows of the whole batch's views (:class:`Shard`). None: ``x`` is the batch.

    Returns:
        (B, C, H, W) float images in [0, 1].
    """
    x = crop_flip(x, p.crop_min_scale, p.flip_prob, g, shard)
    if p.jitter_prob > 0 and p.jitter_strength > 0:
        x = colour_jitter(x, p.jitter_prob, p.jitter_strength, g, shard)
    if p.grayscale_prob > 0:
        x = random_grayscale(x, p.grayscale_prob, g, shard)
    if p.blur_prob > 0:
        x = gaussian_blur(x, p.blur_prob, g, shard=shard)
    if p.solarize_prob > 0:
        x = solarize(x, p.solarize_prob, g, shard=shard)
    return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation with training-set statistics ``mean``/``std`` of shape (C,)."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
