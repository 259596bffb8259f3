"""What every method shares: the MLP head and the step's output to the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    """Linear-BN-ReLU-Linear head (BYOL projector and predictor): (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class StepOut:
    """What a method's ``loss`` hands the training loop for one step."""

    loss: torch.Tensor  # scalar, with grad
    h1: torch.Tensor  # (B, D) encoder representations of view 1, detached
    z1: torch.Tensor  # (B, P) projections of view 1, detached (what a queue source stores)
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # (anchor rows, neighbour rows)
    neighbour_use: torch.Tensor | float = 0.0  # share of positives that came from a neighbour
