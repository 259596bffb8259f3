"""Benchmark: the same stages timed against the pipeline package of several git revisions.

    .venv/bin/python bench/bench_revisions.py --revisions 164f983 WORKTREE --n 10000 --size 28
    .venv/bin/python bench/bench_revisions.py --revisions HEAD~5 HEAD --stages latent-ae byol
    .venv/bin/python bench/bench_revisions.py --revisions HEAD WORKTREE --stages byol simclr

Each revision's ``pipeline/`` and ``workflow/`` are exported (``git archive``; ``WORKTREE``
is the working tree as it is) into a temporary folder, and every stage runs there in a fresh
process with that package first on ``sys.path``: ``train_latent`` of a latent model
(``latent-<model>``), or the baseline run of a training method (``byol``, ``simclr``,
``nnclr``): ``pipeline.train.loop.train`` in a revision that has it, ``train_byol`` of
``pipeline.byol`` in one from before the method seam (BYOL only). Each stage takes its
dataclass defaults (what a user of that revision got) except for the epochs. All revisions
read one prepared data set: the 8x8 scikit-learn digits upscaled to ``--size`` px and
repeated with random shifts up to ``--n`` training images. Printed: training images/s (the
median epoch after the first, from the stage's own per-epoch seconds), per stage and
revision, and the ratio to the first revision. Revisions alternate within each repeat, so a
noisy machine hits all alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
# What a stage imports or reads at run time: the package, and the schema and presets it
# validates params against.
PARTS = ("pipeline", "workflow")
# Training stages: each method's baseline (a revision from before the method seam has byol).
# Listed, not imported: a worker must import only the package of its own revision.
METHODS = ("byol", "simclr", "nnclr")


def make_data(n: int, size: int, path: Path, seed: int = 0) -> None:
    """Digits at ``size`` px, shifted by up to 2 px, ``n`` training and 10 % as many test."""
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(ROOT))
    from pipeline.io import Prepared, save_prepared

    digits = load_digits()
    rng = np.random.default_rng(seed)
    total = n + max(1, n // 10)
    pick = rng.integers(0, len(digits.images), total)
    small = (digits.images[pick] * (255 / 16)).astype(np.float32)
    scale = size / 8
    grid = (np.arange(size) / scale).astype(int).clip(0, 7)
    images = small[:, grid][:, :, grid]
    shift = rng.integers(-2, 3, (total, 2))
    for i, (dy, dx) in enumerate(shift):
        images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    split = np.array(["train"] * n + ["test"] * (total - n))
    save_prepared(path, Prepared(images.astype(np.uint8)[..., None],
                                 digits.target[pick].astype(np.int64), split,
                                 np.arange(total, dtype=np.int64),
                                 [str(c) for c in range(10)]))


def export(revision: str, dest: Path) -> Path:
    """The ``pipeline`` package (and ``workflow/``) of ``revision`` under ``dest``; returns
    the import root."""
    dest.mkdir(parents=True)
    if revision == WORKTREE:
        import shutil

        for part in PARTS:
            shutil.copytree(ROOT / part, dest / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        return dest
    archive = dest / "pipeline.tar"
    try:
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision,
                        *PARTS], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(
            f"error: cannot export revision {revision!r}: {e.stderr.strip()}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def cannot_train(root: Path, method: str) -> str | None:
    """Why the package under ``root`` cannot train ``method``'s baseline, or None."""
    if (root / "pipeline" / "train" / "loop.py").is_file():
        return None
    if (root / "pipeline" / "byol.py").is_file():
        return None if method == "byol" else (
            f"this revision trains BYOL only (pipeline/byol.py), not {method}")
    return "this revision has neither pipeline/train/loop.py nor pipeline/byol.py"


def train_baseline(root: Path, method: str, epochs: int, data: Path, work: Path) -> None:
    """Train ``method``'s baseline with the package under ``root``, whichever API it has:
    ``pipeline.train.loop.train`` (every method) or, before the method seam, BYOL's own
    ``pipeline.byol.train_byol``. Chosen by the files, so that a revision whose package
    fails to import says why instead of passing for an older one."""
    why = cannot_train(root, method)
    if why:
        raise SystemExit(f"error: {why}")
    outputs = (data, None, work / "enc.pt", work / "state.pt", work / "history.csv",
               work / "loss.png", "cpu")
    if (root / "pipeline" / "train" / "loop.py").is_file():
        from pipeline.train.grid import Run
        from pipeline.train.loop import train
        from pipeline.train.params import TrainParams

        train(TrainParams(epochs=epochs), Run(method), 0, *outputs)
    else:
        from pipeline.byol import ByolParams, train_byol

        train_byol(ByolParams(epochs=epochs), "baseline", 0, *outputs)


def worker(stage: str, root: Path, data: Path, epochs: int, work: Path) -> list[float]:
    """Run one stage with the ``pipeline`` under ``root`` first on sys.path; per-epoch
    seconds."""
    if stage in METHODS:
        train_baseline(root, stage, epochs, data, work)
        curve = work / "history.csv"
    else:
        from pipeline.latent import LatentParams, train_latent

        train_latent(LatentParams(epochs=epochs), stage.removeprefix("latent-"), data,
                     work / "model.pt", work / "loss.csv", work / "loss.png", work / "recon.png",
                     "cpu")
        curve = work / "loss.csv"
    with open(curve) as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh)]


def run_stage(root: Path, stage: str, args: argparse.Namespace, data: Path,
              work: Path) -> float:
    """Training images/s of ``stage`` with the package under ``root``, in a fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", stage, "--root", str(root), "--data",
           str(data), "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--workdir", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"error: {stage} failed under {root}:\n{tail}")
    seconds = json.loads(done.stdout.strip().splitlines()[-1])
    timed = seconds[1:] or seconds  # the first epoch carries one-off warm-up costs
    return args.n / statistics.median(timed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revisions", nargs="+", default=["HEAD", WORKTREE],
                    help=f"git revisions, or {WORKTREE} for the working tree")
    ap.add_argument("--stages", nargs="+", default=["latent-ae", "latent-vae",
                                                    "latent-autodecoder", "byol"],
                    help="latent-<model> and/or a training method's baseline: "
                         f"{', '.join(METHODS)} (before the method seam: byol only)")
    ap.add_argument("--n", type=int, default=10000, help="training images")
    ap.add_argument("--size", type=int, default=28, help="image side in pixels")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for stage in args.stages:
        if stage not in METHODS and not stage.startswith("latent-"):
            ap.error(f"--stages: unknown stage {stage!r}; use latent-<model> or one of "
                     f"{', '.join(METHODS)}")
    if args.worker:
        sys.path.insert(0, str(args.root))
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.root, args.data, args.epochs,
                                args.workdir)))
        return 0
    import torch

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.n} training images {args.size}x{args.size}x1, "
          f"{args.epochs} epochs, {args.repeats} repeat(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(args.n, args.size, tmp / "prepared")
        roots = {r: export(r, tmp / f"rev{i}") for i, r in enumerate(args.revisions)}
        for rev, root in roots.items():  # before any stage runs
            for stage in args.stages:
                why = stage in METHODS and cannot_train(root, stage)
                if why:
                    raise SystemExit(f"error: {stage} under {rev}: {why}")
        rates: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            for stage in args.stages:
                order = args.revisions if rep % 2 == 0 else args.revisions[::-1]
                for rev in order:
                    work = tmp / "work" / f"{stage}-{args.revisions.index(rev)}-{rep}"
                    rates.setdefault((stage, rev), []).append(
                        run_stage(roots[rev], stage, args, tmp / "prepared", work))
    print(f"{'stage':<20}{'revision':<14}{'img/s':>9}{'x first':>9}")
    for stage in args.stages:
        first = None
        for rev in args.revisions:
            rate = statistics.median(rates[stage, rev])
            first = first or rate
            print(f"{stage:<20}{rev:<14}{rate:>9.0f}{rate / first:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
