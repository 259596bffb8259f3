"""Collapse checks of a latent model while it trains and its health when done, against the
mean image. The thresholds and the verdicts (:class:`CollapseCheck`) are in ``collapse``, which
needs no torch."""

from __future__ import annotations

import sys

import torch

from pipeline.augment import to_float
from pipeline.latent.collapse import CollapseCheck
from pipeline.latent.models import ENCODE_BATCH, AutoDecoder

# Images used for the per-epoch check: evenly spaced over the training set.
PROBE_IMAGES = 2048


@torch.no_grad()
def mean_image(images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-pixel mean of uint8 (N, H, W, C) images as float (C, H, W) in [0, 1], in chunks."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for s in range(0, len(images), chunk):
        total += images[s:s + chunk].double().sum(0)
    return (total / (255.0 * len(images))).permute(2, 0, 1).float()


def spread(z: torch.Tensor) -> float:
    """Variance of latents (N, D) across images over their mean squared norm; 0 = one point."""
    z = z.double()
    scale = z.pow(2).sum(1).mean().item()
    return z.var(0, unbiased=False).sum().item() / scale if scale > 0 else 0.0


def effective_dim(z: torch.Tensor) -> float:
    """Participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues of (N, D) latents:
    1 when all variance lies along one direction, D when it is spread evenly."""
    z = z.double() - z.double().mean(0)
    eig = torch.linalg.eigvalsh(z.T @ z / max(len(z), 1)).clamp(min=0)
    return (eig.sum() ** 2 / eig.pow(2).sum()).item() if eig.sum() > 0 else 0.0


def _latent_of(net: torch.nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The representation of training images ``x`` at code rows ``index``: (N, dim)."""
    return net.codes(index) if isinstance(net, AutoDecoder) else net.represent(x)


@torch.no_grad()
def reference_mse(images: torch.Tensor, positions: torch.Tensor, mean: torch.Tensor) -> float:
    """MSE of the images at ``positions`` to the training mean image (C, H, W): the error of
    a model that draws the same image for every input. Computed once per run."""
    total = 0.0
    for s in range(0, len(positions), ENCODE_BATCH):
        x = to_float(images[positions[s:s + ENCODE_BATCH]])
        total += (x - mean).pow(2).sum().item()
    return total / (len(positions) * mean.numel())


@torch.no_grad()
def probe(net: torch.nn.Module, images: torch.Tensor, positions: torch.Tensor
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


def final_health(net: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, model: str,
                 dim: int, collapse: str) -> dict:
    """Health of the trained model over every training image, also logged in one line.

    Args:
        images: uint8 (N, H, W, C) training images on the model's device; mean: their
            :func:`mean_image`; collapse: the verdict of training ("" when none).

    Returns:
        recon_mse, mean_image_mse, recon_ratio, latent_spread, latent_effective_dim,
        collapsed (bool) and collapse.
    """
    net.eval()
    all_rows = torch.arange(len(images), device=images.device)
    recon_mse, z = probe(net, images, all_rows)
    reference = reference_mse(images, all_rows, mean)
    health = {"recon_mse": recon_mse, "mean_image_mse": reference,
              "recon_ratio": CollapseCheck(model, reference, 0).ratio(recon_mse),
              "latent_spread": spread(z), "latent_effective_dim": effective_dim(z),
              "collapsed": bool(collapse), "collapse": collapse}
    print(f"{model}: training images' reconstruction MSE {recon_mse:.4g}, mean image's "
          f"{reference:.4g} (ratio {health['recon_ratio']:.3f}), latent spread "
          f"{health['latent_spread']:.3g}, effective dimension "
          f"{health['latent_effective_dim']:.2f} of {dim}", file=sys.stderr)
    return health
