"""Device choice (one claimed GPU per job on a multi-GPU host) and seeding, for every stage."""

from __future__ import annotations

import fcntl
import os
import random
import re
import tempfile
import time

import numpy as np
import torch

from pipeline import PipelineError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto`` to CUDA when present, else CPU; check an explicit choice exists.

    ``auto`` or ``cuda`` on a host with several GPUs claims one free GPU for this process
    (see ``claim_devices``); later calls return the same one.
    """
    global _CLAIMED
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} requested but CUDA is not available")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise PipelineError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    if name in ("auto", "cuda"):
        if _CLAIMED is None:
            _CLAIMED = claim_devices(name, 1)[0]
        return _CLAIMED
    return torch.device(name)


_CLAIMED: torch.device | None = None  # the GPU this process claimed through resolve_device


# Jobs that Snakemake runs side by side on one multi-GPU host (``--resources gpu=N``) each
# claim a free device here, so they spread over the GPUs instead of all landing on cuda:0.
# A claim is an exclusive flock on one file per device: the kernel drops it when the process
# exits, however it exits, so a killed job never leaves a slot taken.
_HELD: list[int] = []  # open lock files, kept for the life of the process
CLAIM_WAIT_S = 120.0  # a slot is usually freed within seconds: the previous job is exiting


def _lock_dir() -> str:
    """One lock folder per host and user (``NNBYOL_GPU_LOCK_DIR`` overrides)."""
    path = os.environ.get("NNBYOL_GPU_LOCK_DIR") or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
        f"nnbyol-gpu-slots-{os.getuid()}",
    )
    os.makedirs(path, exist_ok=True)
    return path


def _slot_keys(n: int) -> list[str]:
    """A host-wide name per visible device: its UUID when torch knows it, else its index.

    Under SLURM each job may see its own GPU as ``cuda:0``; the UUID keeps two such jobs on
    one node from contending for a slot they do not share.
    """
    keys = []
    for i in range(n):
        uuid = str(getattr(torch.cuda.get_device_properties(i), "uuid", "") or "")
        uuid = re.sub(r"[^A-Za-z0-9-]", "", uuid)  # a file name, whatever torch prints
        keys.append(f"gpu-{uuid}" if uuid else f"gpu-index-{i}")
    return keys


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _claim_slots(keys: list[str], count: int, wait_s: float) -> list[int]:
    """Lock ``count`` of the slots named by ``keys``; return their indices, lowest first."""
    lock_dir = _lock_dir()
    deadline = time.monotonic() + wait_s
    while True:
        got: list[tuple[int, int]] = []
        for i, key in enumerate(keys):
            fd = _try_lock(os.path.join(lock_dir, key + ".lock"))
            if fd is not None:
                got.append((i, fd))
                if len(got) == count:
                    _HELD.extend(fd for _, fd in got)
                    return [i for i, _ in got]
        for _, fd in got:  # all or nothing, so two waiting claims never deadlock
            os.close(fd)
        if time.monotonic() >= deadline:
            raise PipelineError(
                f"no {count} free GPU slot(s) of {len(keys)} on this host after {wait_s:.0f} s "
                f"(held by other nnbyol jobs, locks in {lock_dir}); lower --resources gpu"
            )
        time.sleep(0.2 + 0.3 * random.random())


def claim_devices(name: str, count: int) -> list[torch.device]:
    """Devices for ``count`` processes of one job, each its own GPU where there are several.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        count: processes wanting a device (``train.processes``; 1 for a plain stage).

    Returns:
        ``count`` devices. ``cpu`` (or ``auto`` without CUDA) gives ``[cpu] * count``; an
        explicit ``cuda:N`` is honoured as is; ``auto``/``cuda`` on a host with one GPU gives
        ``cuda:0`` unclaimed, and with several claims ``count`` free GPUs for the life of the
        process, waiting up to ``CLAIM_WAIT_S`` while other jobs hold them all.
    """
    if count < 1:
        raise PipelineError(f"train.processes must be >= 1, got {count}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name.startswith("cuda:"):
        dev = resolve_device(name)
        if dev.type == "cuda" and count > 1:
            raise PipelineError(
                f"device {name!r} names one GPU but train.processes is {count}; use auto or cuda"
            )
        if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"device {name!r} requested but only "
                                f"{torch.cuda.device_count()} GPU(s) are visible")
        return [dev] * count
    if name != "cuda":
        raise PipelineError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} requested but CUDA is not available")
    n = torch.cuda.device_count()
    if count > n:
        raise PipelineError(f"train.processes is {count} but this host has {n} visible GPU(s)")
    if n == 1:
        return [torch.device("cuda", 0)]
    return [torch.device("cuda", i) for i in _claim_slots(_slot_keys(n), count, CLAIM_WAIT_S)]


# Convolutional models and their image batches use the channels-last (NHWC) layout on every
# device: tensor cores want it on CUDA, and oneDNN's NHWC kernels on CPU made a BYOL step fed
# by augmented views 1.3-1.6x faster end to end (bench/bench_byol.py --layouts, see
# docs/BENCHMARKS.md); NCHW views against NHWC-strided weights were the slow mix.
LAYOUT = torch.channels_last


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
