"""BYOL (Grill et al. 2020): online and target branches, the EMA, the regression loss, and
the neighbour-mixed targets of the weighted and top-k uses."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.methods.heads import MLP, StepOut
from pipeline.train.optim import tau_at


class Online(nn.Module):
    """Encoder + projector + predictor; ``forward`` returns (representation, prediction)."""

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = MLP(encoder.out_dim, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.predictor(self.projector(h))


class Target(nn.Module):
    """EMA copy of the online encoder + projector: (B, C, H, W) -> (B, proj_dim); no gradients."""

    def __init__(self, online: Online):
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def target_params(online: Online) -> list[torch.Tensor]:
    """The online tensors the target tracks, in the target's parameter order."""
    return [*online.encoder.parameters(), *online.projector.parameters()]


def target_buffers(online: Online) -> list[torch.Tensor]:
    return [*online.encoder.buffers(), *online.projector.buffers()]


@torch.no_grad()
def ema_update(target: Target, online: Online, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, for all parameters in one foreach call.

    Buffers (BatchNorm running statistics) are copied from the online network: the target
    normalises with batch statistics while training, and copying keeps extra target passes
    (the neighbour views) from leaving any trace.
    """
    t_params = list(target.parameters())
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, target_params(online), alpha=1.0 - tau)
    t_buffers = list(target.buffers())
    if t_buffers:
        torch._foreach_copy_(t_buffers, target_buffers(online))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-pair BYOL regression loss 2 - 2 cos(p, z): (B, D), (B, D) -> (B,)."""
    return 2.0 - 2.0 * (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)


def symmetric_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Both view orders summed, mean over the batch: p_i predicts the target of the other view."""
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


def weighted_target(z: torch.Tensor, neighbours: tuple[torch.Tensor, ...],
                    weights: tuple[float, ...]) -> torch.Tensor:
    """``weights[0] * unit(z) + sum_j weights[j + 1] * unit(neighbours[j])``: (B, D) each.

    With weights (1,) this is ``unit(z)`` exactly, and a neighbour of weight 0 adds exactly
    nothing (x + 0 * y == x for finite y): the neighbour variants at w = 0, k = 1 reproduce
    the baseline bit for bit.
    """
    out = weights[0] * F.normalize(z.float(), dim=-1)
    for w, n in zip(weights[1:], neighbours, strict=True):
        out = out + w * F.normalize(n.float(), dim=-1)
    return out


class BYOL(nn.Module):
    """The online network learns to predict the EMA target's projection of the other view.

    Args:
        encoder: (B, C, H, W) -> (B, encoder.out_dim), the exported representation network.
        proj_hidden, proj_dim: the projector's and predictor's widths.
        tau_base: the target's initial EMA rate (``byol.tau_base``), rising to 1 (cosine).
    """

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int,
                 tau_base: float = 0.99):
        super().__init__()
        self.online = Online(encoder, proj_hidden, proj_dim)
        self.target = Target(self.online)
        self.tau_base = self.tau = tau_base

    @property
    def encoder(self) -> nn.Module:
        return self.online.encoder

    def trainable(self) -> nn.Module:
        return self.online

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, idx: torch.Tensor, g: torch.Generator,
             n1: tuple[torch.Tensor, ...] = (), n2: tuple[torch.Tensor, ...] = (),
             weights: tuple[float, ...] = (1.0,)) -> StepOut:
        """Both views through online and target, the symmetric loss.

        Args:
            v1, v2: (B, C, H, W) normalised views.
            n1, n2: neighbour views whose target projections mix into view 1's and view 2's
                targets with ``weights`` (the weighted and top-k uses); none for plain BYOL.
        """
        h1, p1 = self.online(v1)
        _, p2 = self.online(v2)
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
            # Neighbour views pass through the target only, in their own batches, so the
            # image views see exactly the batch statistics they would see in the baseline.
            t1 = weighted_target(z1, tuple(self.target(x) for x in n1), weights)
            t2 = weighted_target(z2, tuple(self.target(x) for x in n2), weights)
        return StepOut(symmetric_loss(p1, p2, t1, t2), h1.detach(), z1)

    def after_step(self, out: StepOut, idx: torch.Tensor, step: int, total: int) -> None:
        """The target's EMA step at this step's rate."""
        self.tau = tau_at(step, total, self.tau_base)
        ema_update(self.target, self.online, self.tau)
