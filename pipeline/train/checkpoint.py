"""Checkpoints of a training run: the resumable state, matched against the run before a
resume, and the outputs (history, loss plot, encoder) written from the finished state."""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.io import atomic_path
from pipeline.train.grid import RUNTIME_KEYS, Run
from pipeline.train.params import TrainParams

log = logging.getLogger("pipeline.train")

HISTORY_COLUMNS = ["epoch", "loss", "lr", "tau", "neighbour_use", "neighbour_purity", "spread",
                   "knn_top1", "images_per_s", "seconds"]


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


def write_outputs(final: dict, state: Path, out: Path, history: Path, loss_plot: Path,
                  title: str) -> None:
    """Write history, plot and encoder from the final state, which is already on disk.

    ``state`` stays: if Snakemake is interrupted and discards these outputs as incomplete,
    the re-run finds the finished training in it and only writes the outputs again.
    ``encoder.pt`` is written last, as a hard link to ``state``.
    """
    from pipeline.plots import loss_curves

    rows = final["history"]
    _write_history(rows, history)
    knn = [r.get("knn_top1", "") for r in rows]
    loss_curves({"loss": [r["loss"] for r in rows]}, loss_plot,
                title=f"{title}, seed {final['seed']}",
                accuracy=[math.nan if v == "" else v for v in knn]
                if any(v != "" for v in knn) else None)
    _link_or_copy(state, out)


def matching_state(state: Path, params: TrainParams, run: Run, seed: int, data: str,
                   code: str) -> dict:
    """The checkpoint in ``state`` if it was written for this run, else ``{}``.

    Args:
        data, code: the fingerprints of the training data and of the training code.
    """
    if not state.exists():
        return {}
    try:
        ck = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state means: start afresh
        log.info("ignoring unreadable %s: %s", state, str(e).splitlines()[0])
        return {}
    # Runtime-only keys (the checkpoint interval) may change between a run and its resume.
    same = {k: v for k, v in (ck.get("params") or {}).items() if k not in RUNTIME_KEYS}
    mine = {k: v for k, v in asdict(params).items() if k not in RUNTIME_KEYS}
    if (same == mine and ck.get("run") == run.name and ck.get("seed") == seed
            and ck.get("data") == data and ck.get("code") == code):
        return ck
    log.info("ignoring %s: written for other params, run, seed, data or code", state)
    return {}
