"""BYOL's networks and losses (Grill et al. 2020): heads, online and target branches, EMA."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones import build_backbone


class MLP(nn.Module):
    """Linear-BN-ReLU-Linear head (BYOL projector and predictor): (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


def init_models(backbone: str, proj_hidden: int, proj_dim: int, seed: int, in_channels: int,
                size: int) -> tuple[Online, Target]:
    """Seeded online network and its target copy; the untrained control uses the same draw."""
    torch.manual_seed(seed)
    online = Online(build_backbone(backbone, in_channels, size), proj_hidden, proj_dim)
    return online, Target(online)


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
