"""Device choice and seeding, shared by every stage (thread counts: ``pipeline.threads``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline import PipelineError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto`` to CUDA when present, else CPU; check an explicit choice exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} requested but CUDA is not available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


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
