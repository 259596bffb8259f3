"""Neighbour sources (a registry): where each training step's neighbours come from.

A source answers ``lookup(idx)``, a (B, k) table of training rows nearest first; the queue
also sees every step's target projections through ``observe``. Rows that a filter rejected,
or that a source cannot answer yet, hold the anchor itself: a self pair, which every use
treats as the method's baseline (AdaSim's fallback when the space is poor).

* ``latent``: offline, a table mined once in a latent space (auto-decoder, AE or VAE).
* ``refresh``: offline, a table mined in the features of the previous round's encoder
  (the DAG builds it: embed -> neighbours -> train; ``train.refresh_rounds``).
* ``queue``: a FIFO queue of the (target) projections of previous steps, searched every
  step on the training device (as NNCLR's support set and MSF's memory bank).

Label-free filters: mutual nearest neighbours, and a distance quantile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import PipelineError


@dataclass
class QueueParams:
    queue_size: int = 4096
    k: int = 5


@dataclass
class FilterParams:
    mutual: bool = False
    quantile: float = 1.0


def filter_table(table: np.ndarray, distances: np.ndarray, f: FilterParams) -> np.ndarray:
    """Replace the pairs a filter rejects by self pairs.

    Args:
        table: (N, k) row indices, nearest first.
        distances: (N, k) the matching distances.
        f: ``mutual`` keeps j as a neighbour of i only if i is among j's k neighbours;
            ``quantile`` keeps pairs whose distance is at most that quantile of all N * k
            distances (1.0 keeps every pair).

    Returns:
        (N, k) table, rejected entries set to their own row.
    """
    n, k = table.shape
    keep = np.ones_like(table, dtype=bool)
    if f.mutual:
        # i is among j's neighbours <=> the pair (j, i) exists: look each (i, j) up in the
        # sorted codes of all pairs.
        codes = np.sort((np.arange(n)[:, None] * n + table).ravel())
        back = table * n + np.arange(n)[:, None]
        pos = np.minimum(np.searchsorted(codes, back), codes.size - 1)
        keep &= codes[pos] == back
    if f.quantile < 1.0:
        keep &= distances <= np.quantile(distances, f.quantile)
    return np.where(keep, table, np.arange(n)[:, None])


class TableSource:
    """Offline neighbours: a fixed (N, k) table of training rows (``latent`` and ``refresh``)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.k = table.shape[1]

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


class QueueSource:
    """Online neighbours from a queue of the target projections of previous steps.

    The query for an anchor is its own normalised target projection from the last step that
    trained on it (a memory bank, at most one epoch old); the candidates are the last
    ``queue_size`` target projections, cosine similarity, the anchor's own entries excluded.
    An anchor not seen yet (the first epoch) gets self pairs, so neighbours enter only once
    the network has produced a query for the image. A step never finds its own images'
    current targets: the queue only holds what earlier steps observed.
    """

    def __init__(self, n: int, dim: int, p: QueueParams, quantile: float,
                 device: torch.device):
        self.k, self.quantile = p.k, quantile
        self.bank = torch.zeros(n, dim, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)
        self.z = torch.zeros(p.queue_size, dim, device=device)
        self.rows = torch.full((p.queue_size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        sim = self.bank[idx] @ self.z.T  # (B, Q)
        own = (self.rows[None, :] < 0) | (self.rows[None, :] == idx[:, None])
        sim = sim.masked_fill(own, -torch.inf)
        top_sim, top = sim.topk(self.k, dim=1)
        keep = torch.isfinite(top_sim) & self.seen[idx, None]
        if self.quantile < 1.0 and keep.any():
            # The distance quantile of this step's candidates (cosine distance = 1 - sim).
            keep &= top_sim >= torch.quantile(top_sim[keep], 1.0 - self.quantile)
        return torch.where(keep, self.rows[top], idx[:, None])

    def observe(self, idx: torch.Tensor, z: torch.Tensor, queued: slice = slice(None)) -> None:
        """Store a step's target projections (B, D) of images ``idx``: all in the bank, the
        rows ``queued`` in the queue (with several training processes, ``idx`` and ``z`` are
        the global batch's, and ``queued`` this process's own rows under
        ``train.queue_scope: rank``: the queries stay global, the candidates its own)."""
        z = F.normalize(z.float(), dim=-1)
        self.bank[idx] = z
        self.seen[idx] = True
        z, idx = z[queued], idx[queued]
        pos = (self.ptr + torch.arange(len(idx), device=idx.device)) % len(self.rows)
        self.z[pos] = z
        self.rows[pos] = idx
        self.ptr = (self.ptr + len(idx)) % len(self.rows)

    def state_dict(self) -> dict:
        """What a resumed run needs to find the same neighbours (tensors on the CPU)."""
        return {"bank": self.bank.cpu(), "seen": self.seen.cpu(), **self.queue_state()}

    def queue_state(self) -> dict:
        """The queue alone (its part of :meth:`state_dict`; one per process under
        ``train.queue_scope: rank``)."""
        return {"z": self.z.cpu(), "rows": self.rows.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` or :meth:`queue_state`."""
        for name in ("bank", "seen", "z", "rows"):
            if name in state:
                getattr(self, name).copy_(state[name])
        self.ptr = int(state["ptr"])


def check_queue(p: QueueParams, batch: int, n: int | None, topk: int | None) -> None:
    """The queue's size against the batch and the data (``n`` training images, when known),
    and k against the queue, before any training."""
    if p.queue_size < batch:
        raise PipelineError(f"config key 'train.queue.queue_size': {p.queue_size} is smaller "
                            f"than the batch ({batch}); the queue must hold at least one "
                            "batch of earlier targets")
    if n is not None and p.queue_size > n:
        raise PipelineError(f"config key 'train.queue.queue_size': {p.queue_size} is larger "
                            f"than the {n} training images; lower it")
    if p.k >= p.queue_size:
        raise PipelineError(f"config key 'train.queue.k': {p.k} needs a queue of more than "
                            f"{p.k} targets, but train.queue.queue_size is {p.queue_size}")
    if topk is not None and topk - 1 > p.k:
        raise PipelineError(f"config key 'train.topk.k': {topk} needs {topk - 1} neighbours "
                            f"per image, but train.queue.k is {p.k}; raise it or lower topk.k")
