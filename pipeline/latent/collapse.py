"""Collapse verdicts of a latent model, from numbers its training measured: the thresholds and
:class:`CollapseCheck`. Kept apart from ``health`` (which measures with torch) so that the
neighbours stage's quality gate reads ``SPREAD_MIN`` without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
            latent_spread: :func:`~pipeline.latent.health.spread` of the probe images' latents.
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
