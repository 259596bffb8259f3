"""NNCLR (Dwibedi et al. 2021): SimCLR with the nearest past projection in a queue as positive."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import PipelineError
from pipeline.train.distributed import ALONE, World
from pipeline.train.grid import check_support_queue as check_queue  # noqa: F401 - one home
from pipeline.train.methods.heads import MLP, StepOut
from pipeline.train.methods.simclr import check_temperature, nt_xent


class NNCLR(nn.Module):
    """Encoder + projector + predictor, and a FIFO support queue of past projections.

    The queue lives in buffers (``queue`` (Q, P) float32 unit vectors, ``queue_rows`` (Q,)
    int64 image rows with -1 for empty, ``queue_ptr`` the next slot), so ``state_dict`` carries
    it and a resumed run finds the same neighbours.

    Args:
        encoder: (B, C, H, W) -> (B, encoder.out_dim), the exported representation network.
        proj_hidden: hidden width of the projector and the predictor.
        proj_dim: output width P of both heads.
        temperature: NT-Xent temperature (``nnclr.temperature``).
        queue_size: Q, projections kept (``nnclr.queue_size``).
        k: the positive is drawn uniformly among the k nearest entries (``nnclr.k``).
        world: the training processes: every anchor is scored against the predictions of
            all, and the queue takes the projections of all or of this process only
            (``train.queue_scope``).
    """

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int,
                 temperature: float = 0.2, queue_size: int = 4096, k: int = 1,
                 world: World = ALONE):
        super().__init__()
        check_temperature("nnclr.temperature", temperature)
        if queue_size < 1:
            raise PipelineError(f"config key 'nnclr.queue_size': {queue_size} is less than "
                                "the minimum of 1")
        if k < 1:
            raise PipelineError(f"config key 'nnclr.k': {k} is less than the minimum of 1")
        if k > queue_size:
            raise PipelineError(f"config key 'nnclr.k': {k} is larger than nnclr.queue_size "
                                f"({queue_size})")
        self.encoder = encoder
        self.projector = MLP(encoder.out_dim, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)
        self.temperature = temperature
        self.k = k
        self.world = world
        self.register_buffer("queue", torch.zeros(queue_size, proj_dim))
        self.register_buffer("queue_rows", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def trainable(self) -> nn.Module:
        return self

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's positive from the queue, by cosine similarity.

        Args:
            z: (B, P) projections.
            g: CPU generator for the pick among the k nearest (drawn only when k > 1, for
                every row of the global batch).

        Returns:
            ``(nn, rows)``: (B, P) float32 unit vectors, the chosen entry or ``unit(z)``
            itself while the queue is empty; (B,) int64 image rows of the entries, -1 where
            none was chosen.
        """
        with torch.autocast(z.device.type, enabled=False):  # exact ranking, as in faiss
            z = F.normalize(z.float(), dim=-1)
            filled = self.queue_rows >= 0
            sim = (z @ self.queue.float().T).masked_fill(~filled, -torch.inf)  # (B, Q)
            top_sim, top = sim.topk(self.k, dim=1)  # (B, k), best first
            pick = torch.zeros(len(z), 1, dtype=torch.long, device=z.device)
            if self.k > 1:
                # Uniform among the filled ones of the k nearest (fewer than k while the queue
                # fills): the largest of k random keys, empty slots keyed below any draw.
                own = self.world.shard(len(z) * self.world.size)
                keys = torch.rand(own.total, self.k, generator=g)[own.rows].to(z.device)
                pick = keys.masked_fill(top_sim.isinf(), -1.0).argmax(1, keepdim=True)
            choice = top.gather(1, pick)[:, 0]
            hit = torch.isfinite(top_sim.gather(1, pick)[:, 0])
            nn_z = torch.where(hit[:, None], self.queue[choice].float(), z)
            rows = torch.where(hit, self.queue_rows[choice], -1)
        return nn_z, rows

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, idx: torch.Tensor,
             g: torch.Generator) -> StepOut:
        """Symmetric NT-Xent: NN(z1) against p2 and NN(z2) against p1; no gradient via NN.

        Args:
            v1, v2: (B, C, H, W) views of the batch.
            idx: (B,) int64 training-set rows of the anchors.
            g: CPU generator for the k > 1 draw.

        Returns:
            StepOut with ``pairs`` = (anchor rows, queue rows chosen for view 1), only the
            anchors that got another image's entry, and ``neighbour_use`` their share (0-dim).
        """
        h1 = self.encoder(v1)
        z1 = self.projector(h1)
        z2 = self.projector(self.encoder(v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        n1, rows = self.nearest(z1, g)
        n2, _ = self.nearest(z2, g)
        t, world = self.temperature, self.world
        loss = 0.5 * (nt_xent(n1, p2, t, world) + nt_xent(n2, p1, t, world))
        # The positive may be the anchor's own earlier projection (as in the paper); the log
        # counts only other images, as every neighbour use's does.
        idx = idx.to(rows.device)
        other = (rows >= 0) & (rows != idx)
        return StepOut(loss, h1.detach(), z1.detach(), pairs=(idx[other], rows[other]),
                       neighbour_use=other.float().mean())

    @torch.no_grad()
    def after_step(self, out: StepOut, idx: torch.Tensor, step: int = 0, total: int = 1) -> None:
        """Enqueue the step's view-1 projections (unit vectors) with their rows, FIFO: the
        global batch's, or this process's own (``train.queue_scope``)."""
        z = self.world.queued(F.normalize(out.z1.float(), dim=-1))
        q = len(self.queue_rows)
        idx = self.world.queued(idx.to(self.queue_rows.device))
        # A batch larger than the queue writes only its last Q rows, where enqueuing one at a
        # time would leave them: repeated slots in one indexed write land in undefined order.
        n = len(idx)
        start = self.queue_ptr + max(n - q, 0)
        z, idx = z[-q:], idx[-q:]
        pos = (start + torch.arange(len(idx), device=idx.device)) % q
        self.queue[pos] = z.to(self.queue.dtype)
        self.queue_rows[pos] = idx
        self.queue_ptr.copy_((self.queue_ptr + n) % q)
