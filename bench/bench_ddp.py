"""Benchmark: data-parallel training (train.processes) on the CPU with gloo, and on paper on GPUs.

    python bench/bench_ddp.py --case resnet18_cifar:32 --batch-size 64 --steps 6 \\
        --methods byol simclr nnclr

Measured, each method's training epoch as ``pipeline.train.loop`` runs it (sharded views with
the single process's draws, the method's step, gradient averaging, gathers, queues):
1 process x 1 thread, 1 process x 2 threads and 2 processes x 1 thread on the same global
batch; images/s, the 2x1 / 1x2 ratio and the scaling efficiency 2x1 / (2 x 1x1). Within the
2-process run, the time per step (on rank 0, waiting for the other process included) in the
gradient all-reduce and in the gathers (the contrastive losses' projections, NNCLR's queue,
the spread's representations); then the same collectives alone, one step's sizes after a
barrier (the transfer without the wait).

On paper (printed as an ESTIMATE): the bytes each GPU sends per step (ring all-reduce of the
fp32 gradients, ring all-gathers and the backward all-reduce of the gathered projections,
the queue's entries), and that volume's time on 8 GPUs at published link bandwidths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The spawned training processes import this module by name, however it was loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.augment import normalise  # noqa: E402
from pipeline.device import LAYOUT  # noqa: E402
from pipeline.train.distributed import World, launch  # noqa: E402
from pipeline.train.encoder import init_encoder  # noqa: E402
from pipeline.train.grid import Run  # noqa: E402
from pipeline.train.loop import _epoch, _Loop, autocast_for  # noqa: E402
from pipeline.train.methods import METHODS, build_method  # noqa: E402
from pipeline.train.optim import make_optimizer  # noqa: E402
from pipeline.train.params import NnclrParams, TrainParams  # noqa: E402
from pipeline.train.uses import Views  # noqa: E402

# Published per-direction link bandwidths, GB/s: NVLink 3 (A100), NVLink 4 (H100), and a
# 100 Gb/s InfiniBand port (the slowest link of a ring across nodes).
LINKS = {"8 x A100, NVLink 300 GB/s": 300e9, "8 x H100, NVLink 450 GB/s": 450e9,
         "8 GPUs over nodes, InfiniBand 100 Gb/s (~12 GB/s)": 12e9}
GPUS = 8


@dataclass(frozen=True)
class TimedWorld(World):
    """A :class:`World` that records each gather and gradient all-reduce: (kind, bytes of
    the whole gathered or reduced tensor, whether a backward all-reduce follows, seconds)."""

    calls: list = field(default_factory=list, compare=False, hash=False)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().gather(x)
        self.calls.append(("gather", out.numel() * out.element_size(), x.requires_grad,
                           time.perf_counter() - t0))
        return out

    def average_gradients(self, params) -> None:
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        t0 = time.perf_counter()
        super().average_gradients(params)
        self.calls.append(("all_reduce", sum(g.numel() * g.element_size() for g in grads),
                           False, time.perf_counter() - t0))


def make_loop(method: str, backbone: str, size: int, channels: int, batch: int, steps: int,
              world: World) -> _Loop:
    """A training loop over ``steps`` batches of random images, as ``train`` builds it."""
    params = TrainParams(backbone=backbone, batch_size=batch,
                         optimizer="lars" if backbone.startswith("resnet") else "adamw",
                         nnclr=NnclrParams(queue_size=max(4096, batch)))
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    images = torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)
    model = build_method(method, init_encoder(backbone, 0, channels, size), params.proj_hidden,
                         params.proj_dim, getattr(params, method), world)
    model.to(memory_format=LAYOUT).train()
    optimizer = make_optimizer(params.optimizer, model.trainable(), params.lr,
                               params.weight_decay, params.lars_eta)
    mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
    views = Views(images, None, params.view1, params.view2,
                  lambda x: normalise(x, mean, std).contiguous(memory_format=LAYOUT),
                  world.shard(batch))
    return _Loop(params, Run(method), 0, model, optimizer, views,
                 torch.full((n,), -1, dtype=torch.long), batch, steps, steps, 0,
                 autocast_for("fp32", torch.device("cpu")), world)


def run_epochs(loop: _Loop, warmup: int, steps: int) -> float:
    """Seconds of ``steps`` training steps, after ``warmup`` untimed ones (whose collectives
    the loop's :class:`TimedWorld` then forgets)."""
    loop.steps_per_epoch = warmup
    _epoch(loop, 0, torch.device("cpu"))
    loop.world.calls.clear()
    loop.steps_per_epoch = steps
    return _epoch(loop, 1, torch.device("cpu"))[0]["seconds"]


def replay(calls: list, world: World, repeats: int) -> dict[str, float]:
    """Seconds per step of one step's collectives alone (after a barrier, so no process
    waits for another's compute): the gradient all-reduce, and the gathers with the
    backward all-reduce of those that carry gradients."""
    import torch.distributed as dist

    out = {}
    for kind in ("all_reduce", "gather"):
        buffers = [(torch.zeros(nbytes // 4), grad) for k, nbytes, grad, _ in calls if k == kind]
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for full, grad in buffers:
                if kind == "all_reduce" or grad:
                    dist.all_reduce(full)
                if kind == "gather":
                    parts = list(full.chunk(world.size))
                    dist.all_gather(parts, parts[world.rank].clone())
        out[kind] = (time.perf_counter() - t0) / repeats
    return out


def _worker(args: dict, out: Path, device: str, world: World) -> None:
    """One of the 2 processes: the timed epoch, then its collectives alone; rank 0 writes."""
    timed = TimedWorld(world.rank, world.size, world.queue_scope)
    loop = make_loop(args["method"], *args["case"], args["batch"], args["steps"], timed)
    seconds = run_epochs(loop, args["warmup"], args["steps"])
    in_step = {kind: sum(c[3] for c in timed.calls if c[0] == kind) / args["steps"]
               for kind in ("all_reduce", "gather")}
    step = timed.calls[-len(timed.calls) // args["steps"]:]  # the last step's collectives
    alone = replay(step, timed, args["repeats"])
    if world.main:
        out.write_text(json.dumps({"seconds": seconds, "in_step": in_step, "alone": alone,
                                   "calls": [c[:3] for c in step]}))


def ring_bytes(calls: list, gpus: int) -> dict[str, float]:
    """Bytes each of ``gpus`` processes sends per step in ring collectives: an all-reduce of
    S bytes sends 2 (W - 1) / W x S, an all-gather of S bytes in all (W - 1) / W x S."""
    sent = {"gradients": 0.0, "projections": 0.0}
    for kind, nbytes, grad in calls:
        if kind == "all_reduce":
            sent["gradients"] += 2 * (gpus - 1) / gpus * nbytes
        else:
            sent["projections"] += (gpus - 1) / gpus * nbytes * (3 if grad else 1)
    return sent


def parse_case(case: str) -> tuple[str, int, int]:
    """``backbone:side[:channels]`` -> (backbone, side, channels; 3 for ResNets, else 1)."""
    parts = case.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else (
        3 if parts[0].startswith("resnet") else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="resnet18_cifar:32", help="backbone:side[:channels]")
    ap.add_argument("--batch-size", type=int, default=64, help="the global batch")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="replays of the collectives alone")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    case = parse_case(args.case)
    backbone, size, channels = case
    cpu = platform.processor() or platform.machine()
    print(f"# cpu: {cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the "
          f"start), torch {torch.__version__}, gloo; {backbone} {size}x{size}x{channels}, "
          f"global batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    print(f"{'method':8} {'layout':6} {'img/s':>8} {'step ms':>9} {'all-reduce ms':>14} "
          f"{'gathers ms':>11}")
    threads = torch.get_num_threads()
    results = {}
    for method in args.methods:
        rate = {}
        for layout in ("1x1", "1x2"):
            torch.set_num_threads(int(layout[-1]))
            loop = make_loop(method, *case, args.batch_size, args.steps, TimedWorld())
            rate[layout] = args.steps * args.batch_size / run_epochs(loop, args.warmup,
                                                                     args.steps)
            print(f"{method:8} {layout:6} {rate[layout]:8.1f} "
                  f"{1e3 * args.batch_size / rate[layout]:9.1f} {'-':>14} {'-':>11}")
        torch.set_num_threads(2)  # divided over the 2 processes: 1 thread each
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            launch(_worker, ({"method": method, "case": case, "batch": args.batch_size,
                              "steps": args.steps, "warmup": args.warmup,
                              "repeats": args.repeats}, out), 2, 1, "gathered", "cpu")
            ddp = json.loads(out.read_text())
        rate["2x1"] = args.steps * args.batch_size / ddp["seconds"]
        ms = {k: 1e3 * v for k, v in ddp["in_step"].items()}
        print(f"{method:8} {'2x1':6} {rate['2x1']:8.1f} {1e3 * args.batch_size / rate['2x1']:9.1f}"
              f" {ms['all_reduce']:14.2f} {ms['gather']:11.2f}")
        print(f"{method:8} 2x1 / 1x2 = {rate['2x1'] / rate['1x2']:.2f}; scaling efficiency "
              f"2x1 / (2 x 1x1) = {rate['2x1'] / (2 * rate['1x1']):.2f}; collectives alone "
              f"(one step's sizes): all-reduce {1e3 * ddp['alone']['all_reduce']:.2f} ms, "
              f"gathers {1e3 * ddp['alone']['gather']:.2f} ms")
        results[method] = ddp["calls"]
    torch.set_num_threads(threads)

    print(f"# ESTIMATE, on paper, not measured: {GPUS} GPUs, ring collectives, bandwidth only "
          "(each collective adds its latency, ~10-50 us), fp32 gradients, the step's "
          "projections as measured above at this global batch")
    for method, calls in results.items():
        grads = sum(c[1] for c in calls if c[0] == "all_reduce")
        gathered = sum(c[1] for c in calls if c[0] == "gather")
        sent = ring_bytes(calls, GPUS)
        total = sum(sent.values())
        print(f"ESTIMATE {method}: {grads / 4 / 1e6:.2f} M parameters ({grads / 1e6:.1f} MB "
              f"of gradients), {len([c for c in calls if c[0] == 'gather'])} gathers of "
              f"{gathered / 1e6:.3f} MB in all (projections, queue entries, representations);"
              f" each GPU sends {sent['gradients'] / 1e6:.1f} MB + "
              f"{sent['projections'] / 1e6:.3f} MB per step")
        for link, bandwidth in LINKS.items():
            print(f"ESTIMATE {method}: {link}: {1e3 * total / bandwidth:.3f} ms per step "
                  f"in communication")
    return 0


if __name__ == "__main__":
    sys.exit(main())
