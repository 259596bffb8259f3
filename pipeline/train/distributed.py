"""Data-parallel training over several processes (torch.distributed): starting or joining
the process group, each process's shard of the global batch, and the collectives the loop and
the methods use.

Every process draws the random numbers a single process draws for the whole global batch
(order, neighbour coins and choices, every augmentation parameter) and builds the views of
its own rows only; gradients are averaged every step and the contrastive losses see the
projections of every process, so a step computes what one process computes on the global
batch, apart from BatchNorm's per-process statistics (``train.sync_batchnorm``).

Three ways in: ``train()`` in a plain process spawns ``train.processes`` workers itself;
under torchrun, or SLURM's srun with several tasks, each process joins the launcher's group.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from pipeline import PipelineError
from pipeline.augment import Shard

log = logging.getLogger("pipeline.train")

# Gradients are averaged in flat buckets of about this size: few collectives, and a bounded
# extra copy of the gradients.
BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the default is one process alone,
    for which every collective is the identity.

    ``queue_scope`` (``train.queue_scope``): what a queue of past projections holds with
    several processes, the projections of the whole global batch (``gathered``, identical on
    every process) or of this process's own rows (``rank``).
    """

    rank: int = 0
    size: int = 1
    queue_scope: str = "gathered"

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs and logs (rank 0)."""
        return self.rank == 0

    def shard(self, batch: int) -> Shard:
        """This process's rows of a global batch of ``batch`` (divisible by the size)."""
        per = batch // self.size
        return Shard(self.rank * per, (self.rank + 1) * per, batch)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` (B, ...), concatenated in rank order: (size * B, ...).

        Gradients flow back to each process's own rows: the backward pass sums, over the
        processes, the gradient of each process's loss with respect to these rows.
        """
        if self.size == 1:
            return x
        return _Gather.apply(x, self.size)

    def queued(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of this process's ``x`` that a queue takes (see ``queue_scope``)."""
        return self.gather(x) if self.queue_scope == "gathered" else x

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the processes, in flat buckets."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        for i, grad in enumerate(grads):
            bucket.append(grad)
            full = sum(g.numel() * g.element_size() for g in bucket) >= BUCKET_BYTES
            if full or i == len(grads) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat /= self.size
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                    g.copy_(part.view_as(g))
                bucket = []

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_objects(self, obj: object) -> list:
        """Every process's ``obj`` (tensors on the CPU), in rank order, on rank 0 ([] on the
        others)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out or []

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


ALONE = World()  # one training process: every collective is the identity


class _Gather(torch.autograd.Function):
    """All-gather along the first dimension; the backward pass sums the gradients of the
    whole output over the processes and hands each its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int) -> torch.Tensor:
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * len(x), (dist.get_rank() + 1) * len(x))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rows], None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, on any device (``train.
    sync_batchnorm``): torch's ``nn.SyncBatchNorm`` runs on CUDA only; this one gathers each
    process's count, mean and variance and combines them (Chan et al.), with gradients
    through the gathered statistics. The parameters and buffers are BatchNorm's, so the
    state dict loads into the plain network."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # evaluation (the kNN monitor): the running statistics
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        var, mean = torch.var_mean(xf, dims, unbiased=False)
        count = xf.new_full((1,), x.numel() / x.shape[1])
        stats = _Gather.apply(torch.cat([count, mean, var])[None], dist.get_world_size())
        c = x.shape[1]
        counts, means, variances = stats[:, :1], stats[:, 1:c + 1], stats[:, c + 1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` with every BatchNorm computing global-batch statistics: torch's
    ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` elsewhere. The parameters are the
    same tensors (build the optimiser afterwards or before, alike)."""
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, key, getattr(child, key))  # the same tensors, on their device
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, dev)
    return model


def launcher() -> tuple[int, int, int, str] | None:
    """(rank, world size, local rank, rendezvous address) when torchrun or SLURM's srun (with
    more than one task) started this process; None in a plain process."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                              "MASTER_PORT")):
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), "env://"
    if all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")) and \
            int(env["SLURM_NTASKS"]) > 1:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
        except (OSError, KeyError, subprocess.CalledProcessError) as e:
            raise PipelineError(f"SLURM job with {env['SLURM_NTASKS']} tasks: cannot find its "
                                f"first host (scontrol show hostnames $SLURM_JOB_NODELIST): "
                                f"{e}") from None
        # One port per job, so that two jobs sharing a first host do not meet.
        port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]),
                f"tcp://{hosts[0]}:{port}")
    return None


def _join(init: str, rank: int, size: int, dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=init,
                            rank=rank, world_size=size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, args: tuple, size: int, init: str, devices: list[str],
            threads: int, scope: str, errors) -> None:
    """One spawned process: join the group, run ``fn``, report a PipelineError's line (or a
    file's, as the command line words an OSError)."""
    torch.set_num_threads(threads)
    dev = torch.device(devices[rank])
    try:
        _join(init, rank, size, dev)
        fn(*args, str(dev), World(rank, size, scope))
    except PipelineError as e:
        errors.put(str(e))
        raise
    except OSError as e:
        errors.put(f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, args: tuple, processes: int, nodes: int, queue_scope: str,
           device: str) -> None:
    """Run ``fn(*args, device, world)`` in every training process (``train.processes`` x
    ``train.nodes``) and return when all have finished.

    One process alone runs ``fn`` here. Under torchrun or srun this process joins the
    launcher's group on ``cuda:LOCAL_RANK`` (or the CPU). Otherwise this process spawns the
    ``processes`` workers on 127.0.0.1, each on a device of
    :func:`pipeline.device.claim_devices`, and raises a worker's PipelineError as its own.
    Each process gets the job's CPU threads divided by ``processes`` (at least one), except
    under srun, where each task already holds its own CPUs (``SLURM_CPUS_PER_TASK``).
    """
    from pipeline.device import claim_devices

    size = processes * nodes
    threads = max(1, torch.get_num_threads() // processes)
    found = launcher()
    if found is None and size == 1:
        fn(*args, device, ALONE)
        return
    if found is not None:
        rank, launched, local, init = found
        if launched != size:
            raise PipelineError(
                f"config key 'train.processes': the launcher started {launched} processes, but "
                f"train.processes x train.nodes is {processes} x {nodes} = {size}; start "
                f"{processes} per node on {nodes} node(s) or change the keys")
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda and local >= torch.cuda.device_count():
            raise PipelineError(f"config key 'train.processes': local rank {local} has no GPU "
                                f"({torch.cuda.device_count()} visible on this host)")
        if init == "env://":  # torchrun's processes share the job's threads; srun's tasks
            torch.set_num_threads(threads)  # each have their own (pipeline.threads)
        _join(init, rank, size, dev)
        try:
            fn(*args, str(dev), World(rank, size, queue_scope))
        finally:
            dist.destroy_process_group()
        return
    if nodes > 1:
        raise PipelineError(f"config key 'train.nodes': {nodes} nodes need a launcher that "
                            "starts the processes on every node: run the job under SLURM's "
                            f"srun ({size} tasks) or torchrun")
    devices = [str(d) for d in claim_devices(device, processes)]
    errors = mp.get_context("spawn").SimpleQueue()
    log.info("starting %d training processes on %s, %d thread(s) each", processes,
             ", ".join(devices), threads)
    try:
        mp.start_processes(_worker, (fn, args, size, f"tcp://127.0.0.1:{_free_port()}",
                                     devices, threads, queue_scope, errors),
                           nprocs=processes, start_method="spawn")
    except ProcessException:
        if not errors.empty():
            raise PipelineError(errors.get()) from None
        raise
