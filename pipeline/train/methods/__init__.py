"""The method registry: each self-supervised method is one module here plus one entry below.

A method is an ``nn.Module`` built as ``cls(encoder, proj_hidden, proj_dim, **own_keys)``
(``own_keys``: its section of the config, e.g. ``byol.tau_base``) with ``encoder`` (the
exported network), ``trainable()`` (the module the optimiser updates),
``loss(v1, v2, idx, g, ...) -> StepOut`` and ``after_step(out, idx, step, total)``; its
state (a target network, a queue) lives in its ``state_dict``. With several training
processes, ``loss`` and ``after_step`` see this process's rows of the global batch; a method
that needs the other processes' rows (a contrastive loss, a gathered queue) also takes
``world`` (:class:`pipeline.train.distributed.World`). The neighbour uses each
method takes are ``pipeline.train.grid.METHOD_USES`` (torch-free, read at parse time).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any

from torch import nn

from pipeline.train.distributed import ALONE, World
from pipeline.train.methods.byol import BYOL
from pipeline.train.methods.nnclr import NNCLR
from pipeline.train.methods.simclr import SimCLR

METHODS: dict[str, type[nn.Module]] = {"byol": BYOL, "simclr": SimCLR, "nnclr": NNCLR}
PAPERS = {"byol": "Grill et al. 2020", "simclr": "Chen et al. 2020",
          "nnclr": "Dwibedi et al. 2021"}


def build_method(name: str, encoder: nn.Module, proj_hidden: int, proj_dim: int,
                 own: Any, world: World = ALONE) -> nn.Module:
    """Method ``name`` around ``encoder``, with its own keys (a dataclass) as arguments, and
    the training processes where it gathers across them (``world``, one process alone by
    default)."""
    cls = METHODS[name]
    extra = {"world": world} if "world" in inspect.signature(cls).parameters else {}
    return cls(encoder, proj_hidden, proj_dim, **asdict(own), **extra)
