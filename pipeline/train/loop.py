"""The training loop every method shares: data on the device, views, schedules, precision,
checkpoints and resume, history and logging. The method (``pipeline.train.methods``) owns
its networks, its loss and what happens after a step; the neighbour use
(``pipeline.train.uses``) builds the batch; the source (``pipeline.train.sources``) answers
which images are neighbours."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import PipelineError
from pipeline.augment import normalise
from pipeline.feed import StreamedImages, feed
from pipeline.io import provenance, save_checkpoint
from pipeline.train.checkpoint import matching_state, write_outputs
from pipeline.train.data import RunData, check_run, load_run
from pipeline.train.distributed import World, launch, sync_batchnorm
from pipeline.train.encoder import init_encoder
from pipeline.train.grid import Run
from pipeline.train.methods import build_method
from pipeline.train.monitor import KnnMonitor, Scalars
from pipeline.train.optim import lr_at, make_optimizer
from pipeline.train.params import TrainParams
from pipeline.train.sources import QueueSource, TableSource
from pipeline.train.uses import USES, Streams, Views

log = logging.getLogger("pipeline.train")

# Collapse: the batch std of L2-normalised representations, times sqrt(D), is about 1 for
# isotropic random features and exactly 0 when every image maps to one vector. Trained and
# untrained encoders on digits measure 0.1-0.6 (ReLU features share a positive mean
# direction); a run below this fraction of the isotropic value has collapsed.
COLLAPSE_FRACTION = 1e-2


def step_dtype(precision: str, dev: torch.device) -> torch.dtype:
    """The arithmetic of ``train.precision`` on ``dev``: ``auto`` is bf16 on CUDA and fp32 on
    the CPU (where bf16 pays only with native bf16 instructions), ``bf16`` is bf16 on any
    device, ``fp32`` always fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast_for(precision: str, dev: torch.device) -> torch.autocast:
    """The step's autocast context for ``train.precision`` (:func:`step_dtype`)."""
    dtype = step_dtype(precision, dev)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _stream(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, stream): an epoch's draws need no saved
    state, and they are the same whichever device the images are on
    (:func:`pipeline.augment.rand`)."""
    value = int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(value & (2**63 - 1))


@dataclass
class _Loop:
    """The training state one epoch advances."""

    params: TrainParams
    run: Run
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    views: Views
    labels: torch.Tensor
    batch: int
    steps_per_epoch: int
    total: int
    warmup: int
    autocast: object
    world: World
    step: int = 0
    precision: str = "float32"  # what the step computes in (the summary records it)

    def strength(self) -> float:
        """The neighbours' share at this step: a linear ramp over
        ``neighbour_warmup_epochs``, then 1."""
        ramp = self.params.neighbour_warmup_epochs * self.steps_per_epoch
        return min(1.0, self.step / ramp) if ramp else 1.0


def _epoch(loop: _Loop, epoch: int, dev: torch.device) -> tuple[dict, dict]:
    """Train one epoch; returns its history row (of the global batch, on every process) and
    the epoch's generator states."""
    p, n, model, world = loop.params, len(loop.labels), loop.model, loop.world
    t0 = time.time()
    g_perm = _stream(loop.seed, epoch, 0)
    g = Streams(_stream(loop.seed, epoch, 1), _stream(loop.seed, epoch, 3),
                _stream(loop.seed, epoch, 2))
    perm = torch.randperm(n, generator=g_perm).to(dev)
    make_batch = USES[loop.run.use].make_batch
    queue = loop.views.neighbours if isinstance(loop.views.neighbours, QueueSource) else None
    own = world.shard(loop.batch).rows  # this process's rows of every global batch
    sums = torch.zeros(5, device=dev)  # loss, spread, neighbour use, same label, labelled
    lr = 0.0
    streamed = isinstance(loop.views.images, StreamedImages)
    if streamed:
        loop.views.images.prefetch(perm[:loop.batch][own])
    for i in range(loop.steps_per_epoch):
        idx = perm[i * loop.batch:(i + 1) * loop.batch][own]
        if streamed and i + 1 < loop.steps_per_epoch:  # read the next anchors meanwhile
            loop.views.images.prefetch(perm[(i + 1) * loop.batch:(i + 2) * loop.batch][own])
        lr = lr_at(loop.step, loop.total, loop.warmup, p.lr)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            b = make_batch(loop.views, idx, g, p, loop.strength())
        with loop.autocast:
            extra = {"n1": b.n1, "n2": b.n2, "weights": b.weights} if b.n1 else {}
            out = model.loss(b.v1, b.v2, idx, g.nb, **extra)
        loop.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        world.average_gradients(model.trainable().parameters())
        loop.optimizer.step()
        model.after_step(out, idx, loop.step, loop.total)
        if queue is not None:  # queries of the whole global batch; the queue per scope
            queue.observe(world.gather(idx), world.gather(out.z1),
                          slice(None) if world.queue_scope == "gathered" else own)
        loop.step += 1
        pairs = b.pairs if out.pairs is None else out.pairs
        with torch.no_grad():
            sums[0] += out.loss.detach()
            sums[1] += F.normalize(world.gather(out.h1).float(), dim=-1).std(0).mean()
            sums[2] += b.neighbour_use if out.pairs is None else out.neighbour_use
            if pairs is not None:
                a, nb = loop.labels[pairs[0]], loop.labels[pairs[1]]
                known = (a >= 0) & (nb >= 0)
                sums[3] += (known & (a == nb)).sum()
                sums[4] += known.sum()
    # Each process's loss and neighbour use are means over equal shards, the spread is of
    # the gathered batch: means over the processes; the label counts add up.
    world.sum(sums)
    sums[:3] /= world.size
    loss_sum, spread_sum, use_sum, same, labelled = sums.tolist()
    mean_loss = loss_sum / loop.steps_per_epoch
    if not math.isfinite(mean_loss):
        raise PipelineError(f"{loop.run.name} diverged: loss is {mean_loss} in epoch "
                            f"{epoch + 1}; lower train.lr or check the data")
    seconds = time.time() - t0
    isotropic = 1.0 / math.sqrt(model.encoder.out_dim)
    row = {
        "epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": round(lr, 8),
        "tau": round(model.tau, 6) if hasattr(model, "tau") else "",
        "neighbour_use": round(use_sum / loop.steps_per_epoch, 4),
        # Label agreement of the neighbours this epoch actually used (solo-learn's nn_acc);
        # empty without neighbours or labels.
        "neighbour_purity": round(same / labelled, 4) if labelled else "",
        "spread": round(spread_sum / loop.steps_per_epoch / isotropic, 5),
        "images_per_s": round(loop.steps_per_epoch * loop.batch / seconds, 1),
        "seconds": round(seconds, 3),
    }
    rng = {"torch": torch.get_rng_state(), "perm": g_perm.get_state(),
           "v1": g.v1.get_state(), "v2": g.v2.get_state(), "nb": g.nb.get_state()}
    return row, rng


def _epoch_line(row: dict, epochs: int, elapsed: float, done: int) -> str:
    """One log line per epoch: loss, lr, throughput and the time left at this pace."""
    left = round(elapsed / max(done, 1) * (epochs - row["epoch"]))
    eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    purity, knn = row["neighbour_purity"], row.get("knn_top1", "")
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} lr {row['lr']:.3g} "
            + (f"purity {purity:.3f} " if purity != "" else "")
            + (f"kNN {knn:.3f} " if knn != "" else "")
            + f"{row['images_per_s']:.0f} img/s ETA {eta}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (a job's log, or pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """The training logger, configured once: time, then the message, on stderr."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s train %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _source(run: Run, data: RunData, params: TrainParams, dev: torch.device, ck: dict,
            world: World):
    """The run's neighbour source, chosen by name: an offline table or the queue."""
    if data.nb_table is not None:
        return TableSource(torch.from_numpy(data.nb_table).to(dev))
    if run.source == "queue":
        source = QueueSource(len(data.train.images), params.proj_dim, params.queue,
                             params.filter.quantile, dev)
        if ck:
            source.load_state_dict(ck["queue"])
            if world.size > 1:
                source.load_state_dict(ck["ranks"][world.rank]["queue"])
        return source
    return None


def _rank_state(model: nn.Module, source) -> dict:
    """What differs between the training processes, for a faithful resume: the buffers
    (BatchNorm statistics of each process's shard, NNCLR's queue) and the queue source's
    queue (``train.queue_scope: rank``)."""
    state = {"buffers": {k: v.detach().cpu() for k, v in model.named_buffers()}}
    if isinstance(source, QueueSource):
        state["queue"] = source.queue_state()
    return state


def train(
    params: TrainParams, run: Run, seed: int, data: Path, neighbours: Path | None, out: Path,
    state: Path, history: Path, loss_plot: Path, device: str,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """Train one encoder with ``run``'s method, use and source, and save it to ``out``.

    With ``train.processes`` x ``train.nodes`` above 1, every process trains on its shard of
    each global batch (:mod:`pipeline.train.distributed`) and the first writes the files.

    Args:
        params: stage params (shared keys plus the run's use and method sections).
        run: method, neighbour use and source (:class:`pipeline.train.grid.Run`).
        seed: fixes initialisation, batch order, augmentations and neighbour draws.
        data: the prepared folder.
        neighbours: ``neighbours.parquet`` of an offline source (latent, refresh), else None.
        out: encoder checkpoint to write (``encoder.pt``).
        state: resumable checkpoint; resumed from when it matches. At the end it holds the
            finished training (``out`` is a hard link to it), so a re-run after Snakemake
            discarded the outputs writes them again without training.
        history: per-epoch CSV.
        loss_plot: PNG of the loss curve.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        on_epoch: called after every epoch with its number (from 1) and the encoder,
            outside the timed epoch (benchmarks probe accuracy during training with it); in
            the first process only (picklable, when this process spawns the others).
    """
    setup_logging()
    check_run(params, run, data, neighbours)  # bad input fails here, before any process starts
    launch(_train, (params, run, seed, Path(data), neighbours, Path(out), Path(state),
                    Path(history), Path(loss_plot), on_epoch),
           params.processes, params.nodes, params.queue_scope, device)


def _train(params: TrainParams, run: Run, seed: int, data: Path, neighbours: Path | None,
           out: Path, state: Path, history: Path, loss_plot: Path,
           on_epoch: Callable[[int, nn.Module], None] | None, device: str,
           world: World) -> None:
    """:func:`train` in one training process, on ``device``, as process ``world.rank``."""
    from pipeline.device import LAYOUT, describe, resolve_device

    setup_logging()
    if not world.main:  # one log of the run: the first process's
        log.setLevel(logging.WARNING)
    rd = load_run(params, run, seed, data, neighbours)
    dev = resolve_device(device)
    ck = matching_state(state, params, run, seed, rd.fingerprint, rd.code)
    if "encoder" in ck:
        log.info("training already finished (%s, epoch %d/%d): writing the outputs only; "
                 "delete it to train again", state, ck["epoch"], params.epochs)
        if world.main:
            write_outputs(ck, state, out, history, loss_plot, rd.title)
        world.barrier()
        return

    images_np, header = rd.train.images, rd.header
    n, size, _, channels = images_np.shape
    encoder = init_encoder(header["backbone"], seed, channels, size)
    model = build_method(run.method, encoder, params.proj_hidden, params.proj_dim,
                         getattr(params, run.method), world)
    if params.sync_batchnorm and world.size > 1:
        model = sync_batchnorm(model, dev)
    cuda = dev.type == "cuda"
    model.to(dev, memory_format=LAYOUT)
    optimizer = make_optimizer(params.optimizer, model.trainable(), params.lr,
                               params.weight_decay, params.lars_eta,
                               params.wd_exclude_bias_norm, params.lars_exclude_bias_norm)
    batch = min(params.batch_size, n)
    if batch < params.batch_size:
        log.warning("WARNING: train.batch_size %d is larger than the %d training images: "
                    "training with batches of %d (one step per epoch)", params.batch_size, n, n)
    start_epoch, rows = 0, []
    if ck:
        model.load_state_dict(ck["model"])
        if world.size > 1:
            own = ck["ranks"][world.rank]["buffers"]
            for name, buffer in model.named_buffers():
                buffer.copy_(own[name])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, rows = ck["epoch"], list(ck["history"])
        torch.set_rng_state(ck["rng"]["torch"])
        log.info("resuming from epoch %d (%s)", start_epoch, state)

    # The training set lives on the device as uint8 NHWC and batches are gathered by index,
    # or, above train.device_memory_share of its memory, batches are streamed from disk.
    # Processes on one CPU share its memory, each holding its own copy.
    mean_t, std_t = header["mean"].to(dev), header["std"].to(dev)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return normalise(x, mean_t, std_t).contiguous(memory_format=LAYOUT)

    share = params.device_memory_share / (1 if cuda else params.processes)
    source = _source(run, rd, params, dev, ck, world)
    views = Views(feed(images_np, share, dev), source, params.view1, params.view2, prepare,
                  world.shard(batch))
    if params.compile:
        if cuda:
            model.encoder.forward = torch.compile(model.encoder.forward)
        else:
            log.info("train.compile ignored on %s (CUDA only)", dev)
    steps_per_epoch = n // batch
    loop = _Loop(params, run, seed, model, optimizer, views,
                 torch.from_numpy(rd.train.labels).to(dev), batch, steps_per_epoch,
                 steps_per_epoch * params.epochs, steps_per_epoch * params.warmup_epochs,
                 autocast_for(params.precision, dev), world, step=ck.get("step", 0),
                 precision=str(step_dtype(params.precision, dev)).removeprefix("torch."))

    if dev.type == "cpu" and header["backbone"] != "smallconv" and world.main:
        _warn_slow_backbone(model.encoder, header["backbone"], channels, size,
                            n * (params.epochs - start_epoch))
    log.info("%s seed %d: %s on %s, %d images %dx%dx%d, %d epochs x %d steps of %d%s",
             run.name, seed, header["backbone"], describe(dev), n, size, size, channels,
             params.epochs, steps_per_epoch, batch,
             f" ({world.size} processes x {batch // world.size})" if world.size > 1 else "")
    # The per-epoch kNN monitor on held labelled training images, and TensorBoard scalars:
    # the first process's, outside the timed epoch; neither changes a weight.
    monitor = (KnnMonitor(images_np, rd.train.labels, seed, params.knn_monitor)
               if world.main else None)
    scalars = Scalars(history.parent / "tensorboard" if params.tensorboard and world.main
                      else None, start=start_epoch + 1)
    model.train()
    started = time.time()
    for epoch in range(start_epoch, params.epochs):
        row, rng = _epoch(loop, epoch, dev)
        if monitor is not None:
            accuracy = monitor(model.encoder, dev, prepare)
            row["knn_top1"] = "" if accuracy is None else round(accuracy, 4)
        rows.append(row)
        scalars.write(row)
        log.info(_epoch_line(row, params.epochs, time.time() - started, epoch + 1 - start_epoch))
        if on_epoch is not None and world.main:
            on_epoch(epoch + 1, model.encoder)
        if (epoch + 1) % params.checkpoint_every == 0 and epoch + 1 < params.epochs:
            if cuda:
                rng["cuda"] = torch.cuda.get_rng_state(dev)
            ranks = world.gather_objects(_rank_state(model, source)) if world.size > 1 else []
            if world.main:
                save_checkpoint({"params": asdict(params), "run": run.name, "seed": seed,
                                 "data": rd.fingerprint, "code": rd.code, "epoch": epoch + 1,
                                 "step": loop.step, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "rng": rng,
                                 "history": rows, "provenance": provenance(),
                                 **({"queue": source.state_dict()}
                                    if isinstance(source, QueueSource) else {}),
                                 **({"ranks": ranks} if ranks else {})}, state)
            world.barrier()
    scalars.close()
    if world.main:
        _finish(loop, rows, rd, describe(dev), state, out, history, loss_plot)
    world.barrier()


# A training step per image costs about this many encoder forward-and-backward passes of one
# image: two views through the online network (forward and backward) and the target's
# forward passes (BYOL; the contrastive methods do a little less).
STEP_PASSES = 2.5


def _warn_slow_backbone(encoder: nn.Module, backbone: str, channels: int, size: int,
                        images: int) -> None:
    """Before a ResNet trains on the CPU: one line with the images/s to expect (timed on a
    copy of the encoder, so no weight, statistic or random stream changes) and the time the
    run would take, and the CPU alternative."""
    import copy

    probe = copy.deepcopy(encoder).train()
    x = torch.zeros(8, channels, size, size).contiguous(memory_format=torch.channels_last)
    probe(x).sum().backward()  # the first pass pays for allocation
    started = time.perf_counter()
    probe(x).sum().backward()
    rate = len(x) / (time.perf_counter() - started) / STEP_PASSES
    hours = images / rate / 3600
    log.warning("WARNING: %s on the CPU trains at about %.0f images/s here: this run's %d "
                "images x epochs would take about %.1f h. On a CPU set train.backbone: "
                "smallconv (tens to hundreds of times faster); the ResNets are for GPUs",
                backbone, rate, images, hours)


def _finish(loop: _Loop, rows: list[dict], rd: RunData, device: str, state: Path, out: Path,
            history: Path, loss_plot: Path) -> None:
    """Flag collapse, then write the finished state and, from it, the outputs."""
    p, run, seed = loop.params, loop.run, loop.seed
    final = rows[-1]
    collapsed = final["spread"] < COLLAPSE_FRACTION
    if collapsed:
        log.warning("WARNING: representation collapse in %s seed %d: spread %.2e of the "
                    "isotropic value (threshold %.0e); features carry almost no information",
                    run.name, seed, final["spread"], COLLAPSE_FRACTION)
    summary = {
        "epochs": p.epochs, "train_seconds": round(sum(r["seconds"] for r in rows), 2),
        "device": device, "final_loss": final["loss"], "backbone": rd.header["backbone"],
        "collapsed": bool(collapsed), "spread": final["spread"],
        "neighbour_use": final["neighbour_use"], "images_per_s": final["images_per_s"],
        "optimizer": p.optimizer, "batch_size": loop.batch, "precision": loop.precision,
        "feed": "streamed" if isinstance(loop.views.images, StreamedImages) else "resident",
        "code_version": provenance()["code_version"],  # the training's, on its table row
        "processes": loop.world.size,
    }
    if loop.batch < p.batch_size:
        summary["notes"] = (f"train.batch_size {p.batch_size} clamped to the {loop.batch} "
                            "training images")
    if final["neighbour_purity"] != "":
        summary["neighbour_purity"] = final["neighbour_purity"]
    encoder = {k: v.detach().cpu() for k, v in loop.model.encoder.state_dict().items()}
    # The encoder checkpoint plus what a re-run needs to recognise it; replaces the
    # (larger) mid-training state before any output is written.
    done = {**rd.header, "run": run.name, "columns": {"stage": run.method, **run.columns()},
            "encoder": encoder, "summary": summary, "data": rd.fingerprint, "code": rd.code,
            "epoch": p.epochs, "history": rows}
    save_checkpoint(done, state)
    write_outputs(done, state, out, history, loss_plot, rd.title)
    log.info("wrote %s: loss %.4f, %.1f s", out, final["loss"], summary["train_seconds"])
