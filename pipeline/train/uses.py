"""Neighbour uses: how a training step uses an image's neighbours (a registry).

A use turns a batch of anchor indices (with several training processes, this process's
rows of the global batch: :class:`Views`) into a :class:`Batch`: the two views the method sees,
and optionally neighbour views whose target projections enter each view's target with fixed
weights (BYOL only). Adding a use is one entry in :data:`USES` plus its keys in the schema
(``train.uses``' enum and a ``train.<name>`` section) and the methods that take it in
``pipeline.train.grid.METHOD_USES``; the run names follow from the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.augment import AugmentParams, Shard, augment, rand, to_float
from pipeline.train.sources import QueueSource, TableSource


@dataclass
class Batch:
    """What one step trains on.

    Each view's target is ``weights[0] * unit(target(v)) + sum_j weights[j + 1] *
    unit(target(n[j]))``; with no neighbour views and ``weights == (1.0,)`` it is the method's
    baseline.
    """

    v1: torch.Tensor
    v2: torch.Tensor
    n1: tuple[torch.Tensor, ...] = ()
    n2: tuple[torch.Tensor, ...] = ()
    weights: tuple[float, ...] = (1.0,)
    # What the history logs: the share of positives drawn from neighbours, and the
    # (anchor, neighbour) row pairs that actually entered a target or a view.
    neighbour_use: torch.Tensor | float = 0.0
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Streams:
    """An epoch's random streams: one per anchor view and one for every neighbour draw
    (coins, choices and neighbour views), so that a view's own parameters or a variant's
    use of neighbours never shift another stream."""

    v1: torch.Generator
    v2: torch.Generator
    nb: torch.Generator


class Views:
    """Shared inputs of every use's view builder: the images, the neighbour source
    (:mod:`pipeline.train.sources`; a bare (N, k) table is an offline one), each view's
    augmentation (view 1 and view 2 may differ, as in BYOL) and, with several training
    processes, this process's ``shard`` of the global batch: a use then gets this process's
    rows of the batch, and every per-sample draw is made for the whole batch and its rows
    kept (:class:`pipeline.augment.Shard`), so the rows are those a single process builds."""

    def __init__(self, images: torch.Tensor, neighbours: TableSource | QueueSource
                 | torch.Tensor | None, aug1: AugmentParams, aug2: AugmentParams,
                 prepare: Callable[[torch.Tensor], torch.Tensor], shard: Shard | None = None):
        if isinstance(neighbours, torch.Tensor):
            neighbours = TableSource(neighbours)
        self.images, self.neighbours, self.prepare = images, neighbours, prepare
        self.aug = {1: aug1, 2: aug2}
        self.shard = shard

    def view(self, idx: torch.Tensor, g: torch.Generator, which: int) -> torch.Tensor:
        """View ``which`` (1 or 2) of images ``idx``: (B,) -> (B, C, H, W), normalised."""
        return self.prepare(augment(to_float(self.images[idx]), self.aug[which], g, self.shard))

    def rand(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One uniform per row of ``idx``: (B,) on ``idx``'s device."""
        return rand(len(idx), g, idx.device, self.shard)

    def pick_neighbour(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One of each anchor's k neighbours, uniformly and independently per sample."""
        total = len(idx) if self.shard is None else self.shard.total
        choice = torch.randint(self.neighbours.k, (total,), generator=g, device=g.device)
        if self.shard is not None:
            choice = choice[self.shard.rows]
        rows = torch.arange(len(idx), device=idx.device)
        return self.neighbours.lookup(idx)[rows, choice.to(idx.device)]


def _real(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (anchor, neighbour) pairs that are not self pairs (a filter's or a source's
    fallback), for the purity log."""
    other = a != b
    return a[other], b[other]


def _baseline(v: Views, idx: torch.Tensor, g: Streams, p: Any, s: float = 1.0) -> Batch:
    return Batch(v.view(idx, g.v1, 1), v.view(idx, g.v2, 2))


def _probabilistic(v: Views, idx: torch.Tensor, g: Streams, p: Any, s: float = 1.0) -> Batch:
    """Per sample, with probability p (times the warm-up ramp s), the second view shows a
    random neighbour instead."""
    coin = v.rand(idx, g.nb) < p.probabilistic.p_neighbour * s
    other = torch.where(coin, v.pick_neighbour(idx, g.nb), idx)
    return Batch(v.view(idx, g.v1, 1), v.view(other, g.v2, 2),
                 neighbour_use=(other != idx).float().mean(), pairs=_real(idx, other))


def _weighted(v: Views, idx: torch.Tensor, g: Streams, p: Any, s: float = 1.0) -> Batch:
    """Each view's target mixes in a random neighbour's, with weight w (times the ramp s)."""
    v1, v2 = v.view(idx, g.v1, 1), v.view(idx, g.v2, 2)
    nb = v.pick_neighbour(idx, g.nb)
    w = p.weighted.pos_weight * s
    return Batch(v1, v2, (v.view(nb, g.nb, 1),), (v.view(nb, g.nb, 2),), (1.0 - w, w),
                 neighbour_use=w * (nb != idx).float().mean(),
                 pairs=_real(idx, nb) if w > 0 else None)


def _topk(v: Views, idx: torch.Tensor, g: Streams, p: Any, s: float = 1.0) -> Batch:
    """MSF's top-k mean target (Koohpayegani et al. 2021): each view's target is the mean of
    the normalised target projections of the image's view and of the same view of its
    k - 1 nearest neighbours. k = 1 is the baseline; during a warm-up (s < 1) the
    neighbours' share grows from 0 to (k - 1) / k."""
    v1, v2 = v.view(idx, g.v1, 1), v.view(idx, g.v2, 2)
    m = p.topk.k - 1
    if m == 0:
        return Batch(v1, v2)
    nbs = v.neighbours.lookup(idx)[:, :m]  # (B, k - 1), nearest first
    n1 = tuple(v.view(nbs[:, j], g.nb, 1) for j in range(m))
    n2 = tuple(v.view(nbs[:, j], g.nb, 2) for j in range(m))
    own = 1.0 / p.topk.k + (1.0 - s) * m / p.topk.k
    anchors = idx.repeat_interleave(m)
    return Batch(v1, v2, n1, n2, (own,) + (s / p.topk.k,) * m,
                 neighbour_use=(1.0 - own) * (nbs != idx[:, None]).float().mean(),
                 pairs=_real(anchors, nbs.reshape(-1)))


@dataclass(frozen=True)
class Use:
    """One registered use: its batch builder and whether it needs neighbours."""

    make_batch: Callable[[Views, torch.Tensor, Streams, Any, float], Batch]
    needs_neighbours: bool
    paper: str


USES: dict[str, Use] = {
    "baseline": Use(_baseline, False, "Grill et al. 2020 (BYOL)"),
    "probabilistic": Use(_probabilistic, True, "naive neighbour positives"),
    "weighted": Use(_weighted, True, "neighbour-mixed targets"),
    "topk": Use(_topk, True, "Koohpayegani et al. 2021 (MSF)"),
}
