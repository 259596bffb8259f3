"""Thread counts: the scheduler's grant honoured by torch, BLAS and FAISS, without importing
torch (``prepare`` never needs it, and its import alone is about 0.6 GB of memory); and the
host's GPU count that the workflow checks its requests against."""

from __future__ import annotations

import os
import subprocess
import sys


def host_gpus() -> int:
    """GPUs on this host as ``nvidia-smi -L`` lists them, within CUDA_VISIBLE_DEVICES when set;
    0 without nvidia-smi."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(line.startswith("GPU ") for line in listed.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip()]))
    return n


def slurm_cpus() -> int | None:
    """The CPUs a SLURM job step granted this process (``SLURM_CPUS_PER_TASK``), or None."""
    try:
        return int(os.environ["SLURM_CPUS_PER_TASK"]) or None
    except (KeyError, ValueError):
        return None


def set_threads(threads: int | None) -> None:
    """Honour the scheduler's thread grant in torch, BLAS and FAISS.

    ``threads`` is the rule's count; inside a SLURM job it is capped at the job's own CPUs
    (and taken from them when not given): the count was decided on the submitting host, which
    need not look like the node the job runs on.
    """
    granted = slurm_cpus()
    if granted:
        threads = min(threads, granted) if threads and threads > 0 else granted
    if not threads or threads < 1:
        return
    # torch, BLAS and FAISS read OMP_NUM_THREADS when first imported; importing FAISS here
    # would also defeat the neighbours stage's OpenBLAS kernel choice, which must come first.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # already imported: tell it directly
        sys.modules["torch"].set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
