"""BYOL (Grill et al. 2020) with positives enriched by latent-space neighbours: the training
stage (load, resume, one epoch, save).

The pieces live beside it: networks and losses in ``byol_model``, optimisers and schedules in
``byol_optim``, the variants (neighbour uses) in ``byol_variants``, encoder checkpoints and
the untrained control in ``byol_encoder``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import PipelineError
from pipeline.augment import AugmentParams, normalise
from pipeline.backbones import resolve_backbone
from pipeline.byol_encoder import (  # noqa: F401 - encode_checkpoint, load_encoder re-exported
    encode_checkpoint,
    encoder_header,
    load_encoder,
    save_atomic,
)
from pipeline.byol_model import (
    Online,
    Target,
    ema_update,
    init_models,
    symmetric_loss,
    weighted_target,
)
from pipeline.byol_optim import OPTIMIZERS, lr_at, make_optimizer, tau_at
from pipeline.byol_sources import (
    FilterParams,
    OnlineParams,
    QueueSource,
    TableSource,
    check_online,
    filter_table,
)
from pipeline.byol_variants import VARIANTS, Batch, Streams, Views
from pipeline.config import RUNTIME_KEYS, check_fields
from pipeline.io import (
    TRAINING_SPLITS,
    Prepared,
    atomic_path,
    load_neighbours,
    load_prepared,
    locate,
    provenance,
)

log = logging.getLogger("pipeline.byol")

# Collapse: the batch std of L2-normalised representations, times sqrt(D), is about 1 for
# isotropic random features and exactly 0 when every image maps to one vector. Trained and
# untrained encoders on digits measure 0.1-0.6 (ReLU features share a positive mean
# direction); a run below this fraction of the isotropic value has collapsed.
COLLAPSE_FRACTION = 1e-2

# The sources that decide what training computes: a state written by other code is not
# resumed. workflow/rules/byol.smk lists the same files as the rule's code inputs.
CODE_FILES = ("byol.py", "byol_model.py", "byol_optim.py", "byol_variants.py",
              "byol_sources.py", "byol_encoder.py", "backbones.py", "augment.py")
HISTORY_COLUMNS = ["epoch", "loss", "lr", "tau", "neighbour_use", "neighbour_purity", "spread",
                   "images_per_s", "seconds"]


@dataclass
class ByolParams:
    backbone: str = "auto"
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 1e-4
    lars_eta: float = 0.02
    lars_exclude_bias_norm: bool = True
    wd_exclude_bias_norm: bool = True
    warmup_epochs: int = 2
    tau_base: float = 0.99
    proj_dim: int = 64
    proj_hidden: int = 256
    checkpoint_every: int = 5
    compile: bool = False
    precision: str = "auto"
    # The BYOL paper's asymmetric views: blur always on view 1; rarely blur, sometimes
    # solarise view 2.
    view1: AugmentParams = field(
        default_factory=lambda: AugmentParams(blur_prob=1.0, solarize_prob=0.0))
    view2: AugmentParams = field(
        default_factory=lambda: AugmentParams(blur_prob=0.1, solarize_prob=0.2))
    p_neighbour: float = 0.5
    pos_weight: float = 0.5
    k: int = 5
    # Neighbour runs only: the online source's queue, label-free filters, and a warm-up that
    # ramps the neighbours' share (p, w or the top-k share) linearly from 0.
    online: OnlineParams = field(default_factory=OnlineParams)
    filter: FilterParams = field(default_factory=FilterParams)
    neighbour_warmup_epochs: int = 0


def check_params(params: ByolParams, variant: str) -> None:
    """Validate once, before any work: variant, backbone, optimiser and ranges."""
    if variant not in VARIANTS:
        raise PipelineError(f"unknown BYOL variant {variant!r}; choose one of: "
                            f"{', '.join(VARIANTS)}")
    resolve_backbone(params.backbone, 32)
    if params.optimizer not in OPTIMIZERS:
        raise PipelineError(f"unknown byol.optimizer {params.optimizer!r}; choose one of: "
                            f"{', '.join(OPTIMIZERS)}")
    check_fields(params)


# --------------------------------------------------------------------------- data


def read_neighbours(path: str | Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Neighbour table as row indices into ``ids``: (N, k) int64, the (N, k) distances in the
    same order, and the file metadata.

    Raises PipelineError when the file's ids are not exactly the training ids.
    """
    rows, nbrs, dist, meta = load_neighbours(path)
    anchor, ok_a = locate(ids, rows)
    nb, ok_n = locate(ids, nbrs)
    if len(rows) != len(ids) or not ok_a.all() or not ok_n.all() or \
            len(np.unique(rows)) != len(rows):
        raise PipelineError(
            f"neighbours file {path} is for another data set: ids do not match the "
            f"{len(ids)} training ids of the prepared data ({len(rows)} rows, "
            f"{int((~ok_a).sum()) + int((~ok_n).sum())} unknown ids)"
        )
    table_idx = np.empty_like(nb)
    table_idx[anchor] = nb
    table_dist = np.empty_like(dist)
    table_dist[anchor] = dist
    return table_idx, table_dist, meta


def _fingerprint(*arrays: np.ndarray) -> str:
    """Cheap content hash (shapes, all ids, a strided sample of pixels) for resume checks."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 1_000_000)]).tobytes())
    return h.hexdigest()


def _code_fingerprint() -> str:
    """Hash of :data:`CODE_FILES`: Snakemake re-runs the job after an edit precisely so that
    it trains with the new code."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for name in CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _stream(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, stream): an epoch's draws need no saved
    state, and they are the same whichever device the images are on
    (:func:`pipeline.augment.rand`)."""
    value = int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(value & (2**63 - 1))


@dataclass
class _Run:
    """What one training run reads, checked, before any training."""

    train: Prepared
    nb_table: np.ndarray | None
    online: bool
    title: str
    header: dict
    fingerprint: str
    code: str


def _load_run(params: ByolParams, variant: str, seed: int, data: Path,
              neighbours: Path | None, online: bool) -> _Run:
    check_params(params, variant)
    train = load_prepared(data).subset(*TRAINING_SPLITS)
    if len(train.images) < 2:
        raise PipelineError(f"{data}: BYOL needs at least 2 training images, got "
                            f"{len(train.images)}")
    _, size, width, _ = train.images.shape
    backbone = resolve_backbone(params.backbone, min(size, width))
    nb_table, title = None, f"BYOL {variant}"
    needs = VARIANTS[variant].needs_neighbours
    if online and not needs:
        raise PipelineError(f"BYOL variant {variant!r} uses no neighbours; drop --online")
    if online:
        if neighbours is not None:
            raise PipelineError("give either --neighbours or --online, not both")
        if params.filter.mutual:
            raise PipelineError("config key 'byol.filter.mutual': online neighbours change "
                                "every step, so they have no mutual table; set it to false "
                                "or drop online from byol.sources")
        check_online(params.online, min(params.batch_size, len(train.images)),
                     len(train.images), params.k if variant == "topk" else None)
        title += ", online neighbours"
    elif needs:
        if neighbours is None:
            raise PipelineError(f"BYOL variant {variant!r} needs a neighbours file "
                                "(--neighbours) or --online")
        nb_table, nb_dist, nb_meta = read_neighbours(neighbours, train.ids)
        if variant == "topk" and params.k - 1 > nb_table.shape[1]:
            raise PipelineError(f"config key 'byol.topk.k': {params.k} needs {params.k - 1} "
                                f"neighbours per image, but {neighbours} holds "
                                f"{nb_table.shape[1]}; raise neighbours.k or lower it")
        nb_table = filter_table(nb_table, nb_dist, params.filter)
        kept = float((nb_table != np.arange(len(nb_table))[:, None]).mean())
        log.info("neighbours %s: k=%d metric=%s purity@1=%s, %.1f%% of pairs kept by the "
                 "filters", neighbours, nb_table.shape[1], nb_meta.get("metric", "?"),
                 nb_meta.get("purity_at_1", "?"), 100 * kept)
        title += f", {nb_meta.get('space', '?')} {nb_meta.get('metric', '?')} neighbours"
    fingerprint = _fingerprint(train.ids, train.images,
                               nb_table if nb_table is not None else np.zeros(0))
    header = encoder_header(backbone, train.images, asdict(params), seed)
    return _Run(train, nb_table, online, title, header, fingerprint, _code_fingerprint())


# --------------------------------------------------------------------------- one step


def step_dtype(precision: str, dev: torch.device) -> torch.dtype:
    """The arithmetic of ``byol.precision`` on ``dev``: ``auto`` is bf16 on CUDA and fp32 on
    the CPU (where bf16 pays only with native bf16 instructions), ``bf16`` is bf16 on any
    device, ``fp32`` always fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast_for(precision: str, dev: torch.device) -> torch.autocast:
    """The step's autocast context for ``byol.precision`` (:func:`step_dtype`)."""
    dtype = step_dtype(precision, dev)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def byol_step(net: nn.Module, online: Online, target: Target, optimizer, b: Batch, autocast,
              tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One BYOL update: both views through online and target, symmetric loss, step, EMA.

    Args:
        net: the online network to call (``online`` itself or its compiled wrapper).
        b: views (B, C, H, W), already normalised, plus optional neighbour views.
        autocast: autocast context (:func:`autocast_for`).
        tau: EMA rate for this step.

    Returns:
        the loss (scalar, detached), the online representations of view 1 (B, D) and the
        target projections of view 1 (B, P), which an online neighbour source stores.
    """
    with autocast:
        h1, p1 = net(b.v1)
        _, p2 = net(b.v2)
        with torch.no_grad():
            z1, z2 = target(b.v1), target(b.v2)
            # Neighbour views pass through the target only, in their own batches, so the
            # image views see exactly the batch statistics they would see in the baseline.
            n1 = tuple(target(x) for x in b.n1)
            n2 = tuple(target(x) for x in b.n2)
    loss = symmetric_loss(p1, p2, weighted_target(z1, n1, b.weights),
                          weighted_target(z2, n2, b.weights))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update(target, online, tau)
    return loss.detach(), h1.detach(), z1


# --------------------------------------------------------------------------- one epoch


@dataclass
class _Loop:
    """The training state one epoch advances."""

    params: ByolParams
    variant: str
    seed: int
    net: nn.Module
    online: Online
    target: Target
    optimizer: torch.optim.Optimizer
    views: Views
    labels: torch.Tensor
    batch: int
    steps_per_epoch: int
    total: int
    warmup: int
    autocast: object
    step: int = 0
    precision: str = "float32"  # what the step computes in (the summary records it)

    def strength(self) -> float:
        """The neighbours' share at this step: a linear ramp over
        ``neighbour_warmup_epochs``, then 1."""
        ramp = self.params.neighbour_warmup_epochs * self.steps_per_epoch
        return min(1.0, self.step / ramp) if ramp else 1.0


def _epoch(loop: _Loop, epoch: int, dev: torch.device) -> tuple[dict, dict]:
    """Train one epoch; returns its history row and the epoch's generator states."""
    p, n = loop.params, len(loop.labels)
    t0 = time.time()
    g_perm = _stream(loop.seed, epoch, 0)
    g = Streams(_stream(loop.seed, epoch, 1), _stream(loop.seed, epoch, 3),
                _stream(loop.seed, epoch, 2))
    perm = torch.randperm(n, generator=g_perm).to(dev)
    make_batch = VARIANTS[loop.variant].make_batch
    sums = torch.zeros(5, device=dev)  # loss, spread, neighbour use, same label, labelled
    lr = tau = 0.0
    for i in range(loop.steps_per_epoch):
        idx = perm[i * loop.batch:(i + 1) * loop.batch]
        lr = lr_at(loop.step, loop.total, loop.warmup, p.lr)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            b = make_batch(loop.views, idx, g, p, loop.strength())
        tau = tau_at(loop.step, loop.total, p.tau_base)
        loss, h1, z1 = byol_step(loop.net, loop.online, loop.target, loop.optimizer, b,
                                 loop.autocast, tau)
        if loop.views.neighbours is not None:
            loop.views.neighbours.observe(idx, z1)
        loop.step += 1
        with torch.no_grad():
            sums[0] += loss
            sums[1] += F.normalize(h1.float(), dim=-1).std(0).mean()
            sums[2] += b.neighbour_use
            if b.pairs is not None:
                a, nb = loop.labels[b.pairs[0]], loop.labels[b.pairs[1]]
                known = (a >= 0) & (nb >= 0)
                sums[3] += (known & (a == nb)).sum()
                sums[4] += known.sum()
    loss_sum, spread_sum, use_sum, same, labelled = sums.tolist()
    mean_loss = loss_sum / loop.steps_per_epoch
    if not math.isfinite(mean_loss):
        raise PipelineError(
            f"BYOL variant {loop.variant!r} diverged: loss is {mean_loss} in epoch {epoch + 1}; "
            "lower byol.lr or check the data"
        )
    seconds = time.time() - t0
    isotropic = 1.0 / math.sqrt(loop.online.encoder.out_dim)
    row = {
        "epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": round(lr, 8),
        "tau": round(tau, 6),
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


# --------------------------------------------------------------------------- save


def _write_history(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically; a hard link costs no disk space."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
            # A resumed job links a state written earlier; an output older than its inputs
            # would make Snakemake run the job again on every invocation.
            os.utime(tmp)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(src, tmp)


def _write_outputs(final: dict, state: Path, out: Path, history: Path, loss_plot: Path,
                   title: str) -> None:
    """Write history, plot and encoder from the final state, which is already on disk.

    ``state`` stays: if Snakemake is interrupted and discards these outputs as incomplete,
    the re-run finds the finished training in it and only writes the outputs again.
    ``encoder.pt`` is written last, as a hard link to ``state``.
    """
    from pipeline.plots import loss_curves

    rows = final["history"]
    _write_history(rows, history)
    loss_curves({"BYOL loss": [r["loss"] for r in rows]}, loss_plot,
                title=f"{title}, seed {final['seed']}")
    _link_or_copy(state, out)


def _epoch_line(row: dict, epochs: int, elapsed: float, done: int) -> str:
    """One log line per epoch: loss, lr, throughput and the time left at this pace."""
    left = round(elapsed / max(done, 1) * (epochs - row["epoch"]))
    eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    purity = row["neighbour_purity"]
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} lr {row['lr']:.3g} "
            + (f"purity {purity:.3f} " if purity != "" else "")
            + f"{row['images_per_s']:.0f} img/s ETA {eta}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (a job's log, or pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s byol %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# --------------------------------------------------------------------------- resume


def _matching_state(state: Path, params: ByolParams, variant: str, seed: int,
                    run: _Run) -> dict:
    """The checkpoint in ``state`` if it was written for this run, else ``{}``."""
    if not state.exists():
        return {}
    try:
        ck = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state means: start afresh
        log.info("ignoring unreadable %s: %s", state, str(e).splitlines()[0])
        return {}
    # Runtime-only keys (the checkpoint interval) may change between a run and its resume.
    same = {k: v for k, v in (ck.get("params") or {}).items() if k not in RUNTIME_KEYS["byol"]}
    mine = {k: v for k, v in asdict(params).items() if k not in RUNTIME_KEYS["byol"]}
    if (same == mine and ck.get("variant") == variant and ck.get("seed") == seed
            and ck.get("data") == run.fingerprint and ck.get("code") == run.code):
        return ck
    log.info("ignoring %s: written for other params, variant, seed, data or code", state)
    return {}


# --------------------------------------------------------------------------- the stage


def train_byol(
    params: ByolParams, variant: str, seed: int, data: Path, neighbours: Path | None, out: Path,
    state: Path, history: Path, loss_plot: Path, device: str, online_neighbours: bool = False,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """Train one BYOL encoder and save it to ``out``.

    Args:
        params: stage params (shared BYOL keys plus the variant's own).
        variant: key of :data:`pipeline.byol_variants.VARIANTS`.
        seed: fixes initialisation, batch order, augmentations and neighbour draws.
        data: prepared ``data.npz``.
        neighbours: ``neighbours.parquet`` (a neighbour variant needs it, or ``online``).
        out: encoder checkpoint to write (``encoder.pt``).
        state: resumable checkpoint; resumed from when it matches. At the end it holds the
            finished training (``out`` is a hard link to it), so a re-run after Snakemake
            discarded the outputs writes them again without training.
        history: per-epoch CSV.
        loss_plot: PNG of the loss curve.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        online_neighbours: neighbours from a queue of earlier steps' target projections
            (:class:`pipeline.byol_sources.QueueSource`) instead of a file.
        on_epoch: called after every epoch with its number (from 1) and the online encoder,
            outside the timed epoch (benchmarks probe accuracy during training with it).
    """
    from pipeline.device import LAYOUT, describe, resolve_device

    _setup_logging()
    out, state, history, loss_plot = Path(out), Path(state), Path(history), Path(loss_plot)
    run = _load_run(params, variant, seed, data, neighbours, online_neighbours)
    dev = resolve_device(device)
    ck = _matching_state(state, params, variant, seed, run)
    if "encoder" in ck:
        log.info("training already finished (%s, epoch %d/%d): writing the outputs only; "
                 "delete it to train again", state, ck["epoch"], params.epochs)
        _write_outputs(ck, state, out, history, loss_plot, run.title)
        return

    images_np, header = run.train.images, run.header
    n, size, _, channels = images_np.shape
    online, target = init_models(header["backbone"], params.proj_hidden, params.proj_dim, seed,
                                 channels, size)
    cuda = dev.type == "cuda"
    online.to(dev, memory_format=LAYOUT)
    target.to(dev, memory_format=LAYOUT)
    optimizer = make_optimizer(params.optimizer, online, params.lr, params.weight_decay,
                               params.lars_eta, params.wd_exclude_bias_norm,
                               params.lars_exclude_bias_norm)
    batch = min(params.batch_size, n)
    if batch < params.batch_size:
        log.warning("WARNING: byol.batch_size %d is larger than the %d training images: "
                    "training with batches of %d (one step per epoch)", params.batch_size, n, n)
    start_epoch, rows = 0, []
    if ck:
        online.load_state_dict(ck["online"])
        target.load_state_dict(ck["target"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, rows = ck["epoch"], list(ck["history"])
        torch.set_rng_state(ck["rng"]["torch"])
        log.info("resuming from epoch %d (%s)", start_epoch, state)

    # The whole training set lives on the device as uint8 NHWC; batches are gathered by index.
    mean_t, std_t = header["mean"].to(dev), header["std"].to(dev)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return normalise(x, mean_t, std_t).contiguous(memory_format=LAYOUT)

    source = None
    if run.nb_table is not None:
        source = TableSource(torch.from_numpy(run.nb_table).to(dev))
    elif run.online:
        source = QueueSource(n, params.proj_dim, params.online, params.filter.quantile, dev)
        if ck:
            source.load_state_dict(ck["queue"])
    views = Views(torch.from_numpy(images_np).to(dev), source, params.view1, params.view2,
                  prepare)
    net = online
    if params.compile:
        if cuda:
            net = torch.compile(online)
        else:
            log.info("byol.compile ignored on %s (CUDA only)", dev)
    steps_per_epoch = n // batch
    loop = _Loop(params, variant, seed, net, online, target, optimizer, views,
                 torch.from_numpy(run.train.labels).to(dev), batch, steps_per_epoch,
                 steps_per_epoch * params.epochs, steps_per_epoch * params.warmup_epochs,
                 autocast_for(params.precision, dev), step=ck.get("step", 0),
                 precision=str(step_dtype(params.precision, dev)).removeprefix("torch."))

    log.info("BYOL %s seed %d: %s on %s, %d images %dx%dx%d, %d epochs x %d steps of %d",
             variant, seed, header["backbone"], describe(dev), n, size, size, channels,
             params.epochs, steps_per_epoch, batch)
    online.train()
    target.train()
    started = time.time()
    for epoch in range(start_epoch, params.epochs):
        row, rng = _epoch(loop, epoch, dev)
        rows.append(row)
        log.info(_epoch_line(row, params.epochs, time.time() - started, epoch + 1 - start_epoch))
        if on_epoch is not None:
            on_epoch(epoch + 1, online.encoder)
        if (epoch + 1) % params.checkpoint_every == 0 and epoch + 1 < params.epochs:
            if cuda:
                rng["cuda"] = torch.cuda.get_rng_state(dev)
            save_atomic({"params": asdict(params), "variant": variant, "seed": seed,
                         "data": run.fingerprint, "code": run.code, "epoch": epoch + 1,
                         "step": loop.step, "online": online.state_dict(),
                         "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": rng, "history": rows, "provenance": provenance(),
                         **({"queue": source.state_dict()} if run.online else {})}, state)
    _finish(loop, rows, run, describe(dev), state, out, history, loss_plot)


def _finish(loop: _Loop, rows: list[dict], run: _Run, device: str, state: Path, out: Path,
            history: Path, loss_plot: Path) -> None:
    """Flag collapse, then write the finished state and, from it, the outputs."""
    p, variant, seed = loop.params, loop.variant, loop.seed
    final = rows[-1]
    collapsed = final["spread"] < COLLAPSE_FRACTION
    if collapsed:
        log.warning("WARNING: representation collapse in BYOL %s seed %d: spread %.2e of the "
                    "isotropic value (threshold %.0e); features carry almost no information",
                    variant, seed, final["spread"], COLLAPSE_FRACTION)
    summary = {
        "epochs": p.epochs, "train_seconds": round(sum(r["seconds"] for r in rows), 2),
        "device": device, "final_loss": final["loss"], "backbone": run.header["backbone"],
        "variant": variant, "collapsed": bool(collapsed), "spread": final["spread"],
        "neighbour_use": final["neighbour_use"], "images_per_s": final["images_per_s"],
        "optimizer": p.optimizer, "batch_size": loop.batch,
        "precision": loop.precision,
    }
    if loop.batch < p.batch_size:
        summary["notes"] = (f"byol.batch_size {p.batch_size} clamped to the {loop.batch} "
                            "training images")
    if final["neighbour_purity"] != "":
        summary["neighbour_purity"] = final["neighbour_purity"]
    encoder = {k: v.detach().cpu() for k, v in loop.online.encoder.state_dict().items()}
    # The encoder checkpoint plus what a re-run needs to recognise it; replaces the
    # (larger) mid-training state before any output is written.
    done = {**run.header, "variant": variant, "encoder": encoder, "summary": summary,
            "data": run.fingerprint, "code": run.code, "epoch": p.epochs, "history": rows}
    save_atomic(done, state)
    _write_outputs(done, state, out, history, loss_plot, run.title)
    log.info("wrote %s: loss %.4f, %.1f s", out, final["loss"], summary["train_seconds"])
