"""BYOL (Grill et al. 2020) with positives enriched by latent-space neighbours; resumable."""

from __future__ import annotations

import copy
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
from pipeline.augment import AugmentParams, augment, normalise, to_float
from pipeline.backbones import build_backbone, resolve_backbone
from pipeline.config import check_fields
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


@dataclass
class ByolParams:
    backbone: str = "auto"
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    tau_base: float = 0.99
    proj_dim: int = 64
    proj_hidden: int = 256
    checkpoint_every: int = 5
    compile: bool = False
    augment: AugmentParams = field(default_factory=AugmentParams)
    p_neighbour: float = 0.5
    pos_weight: float = 0.5


# --------------------------------------------------------------------------- model pieces


class MLP(nn.Module):
    """Linear-BN-ReLU-Linear head (BYOL projector and predictor): (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Online(nn.Module):
    """Encoder + projector + predictor; ``forward`` returns (representation, prediction)."""

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = MLP(encoder.out_dim, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.predictor(self.projector(h))


class Target(nn.Module):
    """EMA copy of the online encoder + projector: (B, C, H, W) -> (B, proj_dim); no gradients."""

    def __init__(self, online: Online):
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def target_params(online: Online) -> list[torch.Tensor]:
    """The online tensors the target tracks, in the target's parameter order."""
    return [*online.encoder.parameters(), *online.projector.parameters()]


def target_buffers(online: Online) -> list[torch.Tensor]:
    return [*online.encoder.buffers(), *online.projector.buffers()]


@torch.no_grad()
def ema_update(target: Target, online: Online, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, for all parameters in one foreach call.

    Buffers (BatchNorm running statistics) are copied from the online network: the target
    normalises with batch statistics while training, and copying keeps extra target passes
    (the weighted variant's neighbour views) from leaving any trace.
    """
    t_params = list(target.parameters())
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, target_params(online), alpha=1.0 - tau)
    t_buffers = list(target.buffers())
    if t_buffers:
        torch._foreach_copy_(t_buffers, target_buffers(online))


def tau_at(step: int, total: int, tau_base: float) -> float:
    """Cosine EMA schedule: tau_base at step 0, rising to 1 at ``total``."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / max(total, 1)) + 1.0) / 2.0


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over ``warmup`` steps to ``peak``, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-pair BYOL regression loss 2 - 2 cos(p, z): (B, D), (B, D) -> (B,)."""
    return 2.0 - 2.0 * (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)


def symmetric_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Both view orders summed, mean over the batch: p_i predicts the target of the other view."""
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


def mix_targets(z_img: torch.Tensor, z_nb: torch.Tensor | None, w: float) -> torch.Tensor:
    """(1 - w) * unit(z_img) + w * unit(z_nb); ``unit(z_img)`` alone without a neighbour.

    With w = 0 the sum is bit-identical to ``unit(z_img)`` (x * 1 + y * 0 == x for finite y),
    which is what makes the weighted variant at w = 0 reproduce the baseline exactly.
    """
    z_img = F.normalize(z_img.float(), dim=-1)
    if z_nb is None:
        return z_img
    return (1.0 - w) * z_img + w * F.normalize(z_nb.float(), dim=-1)


# --------------------------------------------------------------------------- optimisers


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
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = g.clone()
                else:
                    state["momentum"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum"], alpha=-group["lr"])


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get decay; biases and norm parameters (ndim <= 1) are excluded."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]


def _adamw(groups, lr):
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(groups, lr=lr)


def _sgd(groups, lr):
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "sgd": _sgd, "lars": LARS}


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float):
    if name not in OPTIMIZERS:
        raise PipelineError(f"unknown byol.optimizer {name!r}; choose one of: "
                            f"{', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](_param_groups(model, weight_decay), lr)


# --------------------------------------------------------------------------- variants


@dataclass
class Batch:
    """What one step trains on: two views, optional neighbour views for the targets."""

    v1: torch.Tensor
    v2: torch.Tensor
    n1: torch.Tensor | None = None
    n2: torch.Tensor | None = None
    w: float = 0.0
    neighbour_use: torch.Tensor | float = 0.0


class Views:
    """Shared inputs of every variant's view builder.

    ``g_aug`` drives the augmentations of the anchor views; ``g_nb`` every neighbour draw
    (coins, choices and the weighted variant's neighbour views), so that variants consuming
    neighbours never shift the anchor stream.
    """

    def __init__(self, images: torch.Tensor, neighbours: torch.Tensor | None,
                 aug: AugmentParams, prepare: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.neighbours, self.aug, self.prepare = images, neighbours, aug, prepare

    def view(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.prepare(augment(to_float(self.images[idx]), self.aug, g))

    def pick_neighbour(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One of each anchor's k neighbours, uniformly and independently per sample."""
        k = self.neighbours.shape[1]
        choice = torch.randint(k, (len(idx),), generator=g, device=idx.device)
        return self.neighbours[idx, choice]


def _baseline(v: Views, idx, g_aug, g_nb, p: ByolParams) -> Batch:
    return Batch(v.view(idx, g_aug), v.view(idx, g_aug))


def _probabilistic(v: Views, idx, g_aug, g_nb, p: ByolParams) -> Batch:
    coin = torch.rand(len(idx), generator=g_nb, device=idx.device) < p.p_neighbour
    other = torch.where(coin, v.pick_neighbour(idx, g_nb), idx)
    return Batch(v.view(idx, g_aug), v.view(other, g_aug),
                 neighbour_use=coin.float().mean())


def _weighted(v: Views, idx, g_aug, g_nb, p: ByolParams) -> Batch:
    v1, v2 = v.view(idx, g_aug), v.view(idx, g_aug)
    nb = v.pick_neighbour(idx, g_nb)
    return Batch(v1, v2, v.view(nb, g_nb), v.view(nb, g_nb), w=p.pos_weight,
                 neighbour_use=p.pos_weight)


VARIANTS: dict[str, Callable[..., Batch]] = {
    "baseline": _baseline, "probabilistic": _probabilistic, "weighted": _weighted,
}
NEEDS_NEIGHBOURS = {"probabilistic", "weighted"}


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


def read_neighbours(path: str | Path, ids: np.ndarray) -> tuple[np.ndarray, dict]:
    """Neighbour table as row indices into ``ids``: (N, k) int64, plus the file metadata.

    Raises PipelineError when the file's ids are not exactly the training ids.
    """
    rows, nbrs, _, meta = load_neighbours(path)
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
    return table_idx, meta


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units of uint8 (N, H, W, C) images, in chunks.

    Chunking keeps a float copy of a large set (STL10's 100k unlabeled images) out of memory.
    """
    total, sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].astype(np.float64) / 255.0
        total = total + x.sum(axis=(0, 1, 2))
        sq = sq + (x * x).sum(axis=(0, 1, 2))
        count += x[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    return mean, np.maximum(std, 1e-3)


def _fingerprint(*arrays: np.ndarray) -> str:
    """Cheap content hash (shapes, all ids, a strided sample of pixels) for resume checks."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 1_000_000)]).tobytes())
    return h.hexdigest()


def _stream(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, epoch, stream): an epoch's draws need no saved state."""
    value = int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value & (2**63 - 1))


# --------------------------------------------------------------------------- training


def byol_step(net: nn.Module, online: Online, target: Target, optimizer, b: Batch, autocast,
              tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One BYOL update: both views through online and target, symmetric loss, step, EMA.

    Args:
        net: the online network to call (``online`` itself or its compiled wrapper).
        b: views (B, C, H, W), already normalised, plus optional neighbour views.
        autocast: autocast context (bf16 on CUDA, disabled on CPU).
        tau: EMA rate for this step.

    Returns:
        the loss (scalar, detached) and the online representations of view 1 (B, D).
    """
    with autocast:
        h1, p1 = net(b.v1)
        _, p2 = net(b.v2)
        with torch.no_grad():
            z1, z2 = target(b.v1), target(b.v2)
            # Neighbour views pass through the target only, in their own batches, so the
            # image views see exactly the batch statistics they would see in the baseline.
            n1 = target(b.n1) if b.n1 is not None else None
            n2 = target(b.n2) if b.n2 is not None else None
    loss = symmetric_loss(p1, p2, mix_targets(z1, n1, b.w), mix_targets(z2, n2, b.w))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update(target, online, tau)
    return loss.detach(), h1.detach()


def _init_models(params: ByolParams, seed: int, in_channels: int, size: int):
    torch.manual_seed(seed)
    encoder = build_backbone(params.backbone, in_channels, size)
    online = Online(encoder, params.proj_hidden, params.proj_dim)
    return online, Target(online)


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_history(rows: list[dict], path: Path) -> None:
    cols = ["epoch", "loss", "lr", "tau", "neighbour_use", "spread", "images_per_s", "seconds"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def _code_fingerprint() -> str:
    """Hash of the sources that decide what training computes (the rule's code inputs).

    A state written by other code is not resumed: Snakemake re-runs the job after an edit
    precisely so that it trains with the new code.
    """
    here = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for name in ("byol.py", "backbones.py", "augment.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


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
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} lr {row['lr']:.3g} "
            f"{row['images_per_s']:.0f} img/s ETA {eta}")


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


def train_byol(
    params: ByolParams, variant: str, seed: int, data: Path, neighbours: Path | None, out: Path,
    state: Path, history: Path, loss_plot: Path, device: str, untrained: bool = False,
) -> None:
    """Train one BYOL encoder (or write the untrained control) and save it to ``out``.

    Args:
        params: stage params (shared BYOL keys plus the variant's own).
        variant: key of :data:`VARIANTS`.
        seed: fixes initialisation, batch order, augmentations and neighbour draws.
        data: prepared ``data.npz``.
        neighbours: ``neighbours.parquet`` (required by the neighbour variants).
        out: encoder checkpoint to write (``encoder.pt``).
        state: resumable checkpoint; resumed from when it matches. At the end it holds the
            finished training (``out`` is a hard link to it), so a re-run after Snakemake
            discarded the outputs writes them again without training.
        history: per-epoch CSV.
        loss_plot: PNG of the loss curve.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        untrained: write the seeded random initialisation only (the control row).
    """
    from pipeline.device import describe, resolve_device

    _setup_logging()
    check_params(params, variant)
    out, state, history, loss_plot = Path(out), Path(state), Path(history), Path(loss_plot)
    dev = resolve_device(device)
    prepared = load_prepared(data)
    train = prepared.subset(*TRAINING_SPLITS)
    if len(train.images) < 2:
        raise PipelineError(f"{data}: BYOL needs at least 2 training images, got "
                            f"{len(train.images)}")
    n, size, _, channels = train.images.shape
    backbone = resolve_backbone(params.backbone, min(size, train.images.shape[2]))
    nb_table, title = None, f"BYOL {variant}"
    if variant in NEEDS_NEIGHBOURS:
        if neighbours is None:
            raise PipelineError(f"BYOL variant {variant!r} needs a neighbours file "
                                "(--neighbours)")
        nb_table, nb_meta = read_neighbours(neighbours, train.ids)
        log.info("neighbours %s: k=%d metric=%s purity@1=%s", neighbours, nb_table.shape[1],
                 nb_meta.get("metric", "?"), nb_meta.get("purity_at_1", "?"))
        title += f", {nb_meta.get('space', '?')} {nb_meta.get('metric', '?')} neighbours"
    mean, std = channel_stats(train.images)

    online, target = _init_models(params, seed, channels, size)
    base = {"backbone": backbone, "in_channels": int(channels), "image_size": int(size),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
            "params": asdict(params), "seed": int(seed), "provenance": provenance()}
    if untrained:
        summary = {"epochs": 0, "train_seconds": 0.0, "device": "none", "backbone": backbone,
                   "variant": "untrained", "collapsed": False}
        _save_atomic({**base, "variant": "untrained", "encoder": online.encoder.state_dict(),
                      "summary": summary}, out)
        log.info("wrote untrained %s encoder to %s", backbone, out)
        return

    fingerprint = _fingerprint(train.ids, train.images,
                               nb_table if nb_table is not None else np.zeros(0))
    cuda = dev.type == "cuda"
    online.to(dev)
    target.to(dev)
    if cuda:
        online.to(memory_format=torch.channels_last)
        target.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(params.optimizer, online, params.lr, params.weight_decay)
    batch = min(params.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * params.epochs
    warmup = steps_per_epoch * params.warmup_epochs

    code = _code_fingerprint()
    start_epoch, step, rows = 0, 0, []
    if state.exists():
        try:
            ck = torch.load(state, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable state means: start afresh
            log.info("ignoring unreadable %s: %s", state, str(e).splitlines()[0])
            ck = {}
        matches = (ck.get("params") == asdict(params) and ck.get("variant") == variant
                   and ck.get("seed") == seed and ck.get("data") == fingerprint
                   and ck.get("code") == code)
        if matches and "encoder" in ck:
            log.info("training already finished (%s, epoch %d/%d): writing the outputs only; "
                     "delete it to train again", state, ck["epoch"], params.epochs)
            _write_outputs(ck, state, out, history, loss_plot, title)
            return
        if matches:
            online.load_state_dict(ck["online"])
            target.load_state_dict(ck["target"])
            optimizer.load_state_dict(ck["optimizer"])
            start_epoch, step, rows = ck["epoch"], ck["step"], list(ck["history"])
            torch.set_rng_state(ck["rng"]["torch"])
            log.info("resuming from epoch %d (%s)", start_epoch, state)
        else:
            log.info("ignoring %s: written for other params, variant, seed, data or code",
                     state)

    # The whole training set lives on the device as uint8 NHWC; batches are gathered by index.
    images = torch.from_numpy(train.images).to(dev)
    nb_dev = torch.from_numpy(nb_table).to(dev) if nb_table is not None else None
    mean_t, std_t = base["mean"].to(dev), base["std"].to(dev)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = normalise(x, mean_t, std_t)
        return x.contiguous(memory_format=torch.channels_last) if cuda else x

    views = Views(images, nb_dev, params.augment, prepare)
    make_batch = VARIANTS[variant]
    net = online
    if params.compile:
        if cuda:
            net = torch.compile(online)
        else:
            log.info("byol.compile ignored on %s (CUDA only)", dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    isotropic = 1.0 / math.sqrt(online.encoder.out_dim)

    log.info("BYOL %s seed %d: %s on %s, %d images %dx%dx%d, %d epochs x %d steps of %d",
             variant, seed, backbone, describe(dev), n, size, size, channels, params.epochs,
             steps_per_epoch, batch)
    online.train()
    target.train()
    started = time.time()
    for epoch in range(start_epoch, params.epochs):
        t0 = time.time()
        g_perm = _stream(seed, epoch, 0, dev)
        g_aug, g_nb = _stream(seed, epoch, 1, dev), _stream(seed, epoch, 2, dev)
        perm = torch.randperm(n, generator=g_perm, device=dev)
        loss_sum = torch.zeros((), device=dev)
        spread_sum = torch.zeros((), device=dev)
        use_sum = torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            lr = lr_at(step, total, warmup, params.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.no_grad():
                b = make_batch(views, idx, g_aug, g_nb, params)
            tau = tau_at(step, total, params.tau_base)
            loss, h1 = byol_step(net, online, target, optimizer, b, autocast, tau)
            step += 1
            loss_sum += loss.detach()
            with torch.no_grad():
                spread_sum += F.normalize(h1.detach().float(), dim=-1).std(0).mean()
            use_sum += b.neighbour_use
        mean_loss = float(loss_sum) / steps_per_epoch
        if not math.isfinite(mean_loss):
            raise PipelineError(
                f"BYOL variant {variant!r} diverged: loss is {mean_loss} in epoch {epoch + 1}; "
                "lower byol.lr or check the data"
            )
        seconds = time.time() - t0
        rows.append({
            "epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": round(lr, 8),
            "tau": round(tau, 6),
            "neighbour_use": round(float(use_sum) / steps_per_epoch, 4),
            "spread": round(float(spread_sum) / steps_per_epoch / isotropic, 5),
            "images_per_s": round(steps_per_epoch * batch / seconds, 1),
            "seconds": round(seconds, 3),
        })
        log.info(_epoch_line(rows[-1], params.epochs, time.time() - started,
                             epoch + 1 - start_epoch))
        last = epoch + 1 == params.epochs
        if (epoch + 1) % params.checkpoint_every == 0 and not last:
            rng = {"torch": torch.get_rng_state(), "perm": g_perm.get_state(),
                   "aug": g_aug.get_state(), "nb": g_nb.get_state()}
            if cuda:
                rng["cuda"] = torch.cuda.get_rng_state(dev)
            _save_atomic({"params": asdict(params), "variant": variant, "seed": seed,
                          "data": fingerprint, "code": code, "epoch": epoch + 1, "step": step,
                          "online": online.state_dict(), "target": target.state_dict(),
                          "optimizer": optimizer.state_dict(), "rng": rng, "history": rows,
                          "provenance": provenance()}, state)
    final = rows[-1]
    collapsed = final["spread"] < COLLAPSE_FRACTION
    if collapsed:
        log.warning("WARNING: representation collapse in BYOL %s seed %d: spread %.2e of the "
                    "isotropic value (threshold %.0e); features carry almost no information",
                    variant, seed, final["spread"], COLLAPSE_FRACTION)
    summary = {
        "epochs": params.epochs, "train_seconds": round(sum(r["seconds"] for r in rows), 2),
        "device": describe(dev), "final_loss": final["loss"], "backbone": backbone,
        "variant": variant, "collapsed": bool(collapsed), "spread": final["spread"],
        "neighbour_use": final["neighbour_use"], "images_per_s": final["images_per_s"],
        "optimizer": params.optimizer, "batch_size": batch,
    }
    encoder = {k: v.detach().cpu() for k, v in online.encoder.state_dict().items()}
    # The encoder checkpoint plus what a re-run needs to recognise it; replaces the
    # (larger) mid-training state before any output is written.
    done = {**base, "variant": variant, "encoder": encoder, "summary": summary,
            "data": fingerprint, "code": code, "epoch": params.epochs, "history": rows}
    _save_atomic(done, state)
    _write_outputs(done, state, out, history, loss_plot, title)
    log.info("wrote %s: loss %.4f, %.1f s", out, final["loss"], summary["train_seconds"])


# --------------------------------------------------------------------------- evaluation


def load_encoder(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Encoder module (eval mode, on ``device``) and the checkpoint dict from ``encoder.pt``."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"encoder checkpoint not found: {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    encoder = build_backbone(ck["backbone"], ck["in_channels"], ck["image_size"])
    encoder.load_state_dict(ck["encoder"])
    return encoder.to(device).eval(), ck


@torch.no_grad()
def encode_checkpoint(
    path: Path, data: Prepared, device: str, batch_size: int = 1024
) -> tuple[np.ndarray, dict]:
    """Frozen features of every image in ``data`` order, and the run's flat summary.

    Args:
        path: ``encoder.pt`` written by :func:`train_byol`.
        data: prepared data set; images must match the checkpoint's channels and size.
        device: where to run the encoder.

    Returns:
        features (N, D) float32 (encoder output, no projector, no augmentation) and a dict of
        scalars/strings (epochs, train_seconds, device, final_loss, backbone, variant, ...).
    """
    from pipeline.device import resolve_device

    dev = resolve_device(device)
    encoder, ck = load_encoder(path, str(dev))
    _, h, _, c = data.images.shape
    if c != ck["in_channels"] or h != ck["image_size"]:
        raise PipelineError(f"{path} was trained on {ck['image_size']} px images with "
                            f"{ck['in_channels']} channels; the data has {h} px, {c} channels")
    mean, std = ck["mean"].to(dev), ck["std"].to(dev)
    out = []
    for start in range(0, len(data.images), batch_size):
        x = torch.from_numpy(data.images[start:start + batch_size]).to(dev)
        out.append(encoder(normalise(to_float(x), mean, std)).float().cpu())
    feats = torch.cat(out).numpy() if out else np.zeros((0, encoder.out_dim), np.float32)
    summary = {k: v for k, v in ck["summary"].items() if isinstance(v, (int, float, str, bool))}
    summary.update(backbone=ck["backbone"], variant=ck["variant"])
    return feats.astype(np.float32), summary
