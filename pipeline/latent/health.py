"""Collapse checks of a latent model while it trains and its health when done, against the
mean image."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from pipeline.augment import to_float
from pipeline.latent.models import ENCODE_BATCH, AutoDecoder

# Reconstruction error at or above this fraction of the mean image's counts as "no better
# than the mean image". Healthy runs measured with the defaults were at 0.2-0.8 by then.
RATIO_MAX = 0.95
# Fewer optimiser steps than this are too short to judge the reconstruction against the
# mean image: a healthy model of a tiny test run may not have left it yet.
MIN_STEPS = 100
# A loss whose epoch mean moved by less than this (relative) over STALL_EPOCHS successive
# epochs "stopped moving": the collapsed AE of issue 12 moved by 1e-5 for 19 epochs, healthy
# runs by more than 1e-3 per epoch in their first epochs.
STALL_TOL = 1e-4
STALL_EPOCHS = 2
# Only a stall within the first epochs is evidence on its own; later it may be convergence.
EARLY_EPOCHS = 5
# Latents whose variance across images is below this fraction of their mean squared norm
# are (numerically) one point: no neighbour structure is left in them.
SPREAD_MIN = 1e-6
# From the second epoch on, a reconstruction this many times worse than the mean image's
# means training diverged (the untrained decoder starts near the mean intensity).
DIVERGED_RATIO = 2.0
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


@dataclass
class CollapseCheck:
    """Collapse verdicts of one training run, fed once per epoch.

    Args:
        model: latent model name, for the message.
        mean_image_mse: the reference, MSE of the probe images to the training mean image.
        epochs: planned epochs (the last one is judged against the mean image in any case).
    """

    model: str
    mean_image_mse: float
    epochs: int
    losses: list[float] = field(default_factory=list)

    def update(self, epoch: int, loss: float, recon_mse: float, latent_spread: float,
               steps: int) -> str | None:
        """One-line verdict when this epoch shows collapse, else None.

        Args:
            epoch: 1-based epoch just finished; loss: its mean training loss.
            recon_mse: MSE of the probe images' reconstructions (model in eval mode).
            latent_spread: :func:`spread` of the probe images' latents.
            steps: optimiser steps taken so far.
        """
        self.losses.append(loss)
        ratio = self.ratio(recon_mse)
        against = (f"reconstruction MSE {recon_mse:.4g} vs the mean image's "
                   f"{self.mean_image_mse:.4g} (ratio {ratio:.3f})")
        evidence = None
        if latent_spread < SPREAD_MIN:
            evidence = (f"the latents have (near) zero variance across training images "
                        f"(relative {latent_spread:.2e}); {against}")
        elif self.stalled() and (epoch <= EARLY_EPOCHS or ratio >= RATIO_MAX):
            first = self.losses[-STALL_EPOCHS - 1]
            evidence = (f"the loss stopped moving ({first:.6g} -> {loss:.6g} over epochs "
                        f"{epoch - STALL_EPOCHS}-{epoch}); {against}")
        elif epoch >= 2 and ratio >= DIVERGED_RATIO:
            evidence = f"training diverged: {against}"
        elif epoch == self.epochs and steps >= MIN_STEPS and ratio >= RATIO_MAX:
            evidence = f"after {steps} steps the {against}: no better than the mean image"
        if evidence is None:
            return None
        return f"latent model {self.model!r} collapsed at epoch {epoch}: {evidence}"

    def ratio(self, recon_mse: float) -> float:
        """Reconstruction error relative to the mean image's (inf when the images are equal)."""
        if self.mean_image_mse > 0:
            return recon_mse / self.mean_image_mse
        return math.inf if recon_mse > 0 else 1.0

    def stalled(self) -> bool:
        last = self.losses[-STALL_EPOCHS - 1:]
        if len(last) <= STALL_EPOCHS:
            return False
        return all(abs(b - a) <= STALL_TOL * max(abs(a), 1e-12)
                   for a, b in zip(last, last[1:], strict=False))


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
