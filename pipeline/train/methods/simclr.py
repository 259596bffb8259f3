"""SimCLR (Chen et al. 2020): a projector on the encoder and the NT-Xent contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import PipelineError
from pipeline.train.distributed import ALONE, World
from pipeline.train.methods.heads import MLP, StepOut


def check_temperature(key: str, temperature: float) -> None:
    """Raise a one-line PipelineError naming ``key`` unless ``temperature`` > 0."""
    if not temperature > 0:  # also catches NaN
        raise PipelineError(f"config key '{key}': {temperature} must be greater than 0")


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float,
            world: World = ALONE) -> torch.Tensor:
    """NT-Xent over both views: each of the 2B vectors against its pair and 2B - 2 negatives.

    With several training processes, ``a`` and ``b`` are this process's rows of the global
    batch; its anchors are scored against the projections of every process (gathered with
    gradients), so the mean of the processes' losses is the single-process loss.

    Args:
        a: (B, P) projections of view 1 (any float dtype; computed in float32).
        b: (B, P) projections of view 2; row i of ``a`` and of ``b`` are a positive pair.
        temperature: the softmax temperature, > 0.
        world: the training processes (:class:`pipeline.train.distributed.World`).

    Returns:
        Scalar: cross-entropy of cos / temperature, mean over the 2B anchors.
    """
    # Autocast would run the matmul in bf16 even on float32 inputs; logits near 1/temperature
    # need the float32 mantissa.
    with torch.autocast(a.device.type, enabled=False):
        a, b = world.gather(a), world.gather(b)
        n = a.shape[0]
        own = world.shard(n)
        z = F.normalize(torch.cat([a, b]).float(), dim=-1)  # (2N, P), N = the global batch
        anchors = torch.cat([torch.arange(own.start, own.stop, device=z.device),
                             torch.arange(n + own.start, n + own.stop, device=z.device)])
        self_mask = torch.zeros(len(anchors), 2 * n, dtype=torch.bool, device=z.device)
        self_mask[torch.arange(len(anchors), device=z.device), anchors] = True
        logits = (z[anchors] @ z.T / temperature).masked_fill(self_mask, -torch.inf)
        return F.cross_entropy(logits, (anchors + n) % (2 * n))


class SimCLR(nn.Module):
    """Encoder + projector; the other view of the same image is the only positive.

    Args:
        encoder: (B, C, H, W) -> (B, encoder.out_dim), the exported representation network.
        proj_hidden: hidden width of the projector.
        proj_dim: output width P of the projector.
        temperature: NT-Xent temperature (key ``simclr.temperature``).
        world: the training processes, whose projections every anchor is scored against.
    """

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int,
                 temperature: float = 0.2, world: World = ALONE):
        super().__init__()
        check_temperature("simclr.temperature", temperature)
        self.encoder = encoder
        self.projector = MLP(encoder.out_dim, proj_hidden, proj_dim)
        self.temperature = temperature
        self.world = world

    def trainable(self) -> nn.Module:
        return self

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, idx: torch.Tensor,
             g: torch.Generator) -> StepOut:
        """NT-Xent of the two views' projections.

        Args:
            v1, v2: (B, C, H, W) views of the batch.
            idx: (B,) int64 training-set rows of the anchors (unused: no neighbours).
            g: CPU generator (unused: SimCLR draws nothing).
        """
        # Separate passes per view, as BYOL's step does, so BatchNorm sees one view at a time.
        h1 = self.encoder(v1)
        z1 = self.projector(h1)
        z2 = self.projector(self.encoder(v2))
        return StepOut(nt_xent(z1, z2, self.temperature, self.world), h1.detach(), z1.detach())

    def after_step(self, out: StepOut, idx: torch.Tensor, step: int = 0, total: int = 1) -> None:
        """Nothing: SimCLR keeps no state between steps."""
