"""Optimisers (AdamW, SGD, LARS) and schedules (learning rate, BYOL's EMA rate) of training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline import PipelineError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017).

    Parameter groups with ``lars_exclude=True`` (biases, norm weights) get neither weight
    decay nor the trust-ratio adaptation, as in the BYOL paper.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["eta"] * p_norm / g_norm, torch.ones_like(p_norm))
                    g = g * trust
                elif group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = g.clone()
                else:
                    state["momentum"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum"], alpha=-group["lr"])


def param_groups(model: nn.Module, weight_decay: float, wd_exclude: bool = True,
                 lars_exclude: bool = True) -> list[dict]:
    """Weights, and biases plus norm parameters (ndim <= 1), in two groups: the second
    without weight decay (``wd_exclude``) and without the LARS trust ratio (``lars_exclude``)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0 if wd_exclude else weight_decay,
             "lars_exclude": lars_exclude}]


def _adamw(groups, lr, eta):
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(groups, lr=lr)


def _sgd(groups, lr, eta):
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def _lars(groups, lr, eta):
    return LARS(groups, lr=lr, eta=eta)


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "sgd": _sgd, "lars": _lars}


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   eta: float = 0.02, wd_exclude: bool = True, lars_exclude: bool = True):
    """The named optimiser over ``model``'s parameters (see :func:`param_groups`)."""
    if name not in OPTIMIZERS:
        raise PipelineError(f"unknown train.optimizer {name!r}; choose one of: "
                            f"{', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](param_groups(model, weight_decay, wd_exclude, lars_exclude), lr,
                            eta)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over ``warmup`` steps to ``peak``, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def tau_at(step: int, total: int, tau_base: float) -> float:
    """Cosine EMA schedule: tau_base at step 0, rising to 1 at ``total``."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / max(total, 1)) + 1.0) / 2.0
