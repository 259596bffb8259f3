"""GPU paths, ready to verify: run this on any machine with CUDA and read what it prints.

    python bench/verify_gpu.py                 # the GPU tests, 1-GPU runs, a 2-GPU DDP run
    python bench/verify_gpu.py --skip-tests    # only the runs and their figures

Three checks, each printed as one ``PASS``/``FAIL``/``SKIP`` line with its figures:
1. ``pytest -m gpu tests``: the suite's CUDA tests (skipped on a machine without CUDA).
2. One GPU: BYOL and NNCLR on a synthetic 32x32x3 set (``--images``, ``--epochs``,
   ``--backbone``), images/s from each run's history.
3. Two GPUs (when two are visible): the same runs with ``train.processes: 2`` over NCCL and
   ``train.sync_batchnorm: true``, against one GPU with synced statistics over the same
   global batch: images/s, the speed-up, and the largest weight difference (bf16 and
   kernel choice differ between one and two GPUs, so the weights agree to a tolerance, not
   bit for bit).

Exit status 0 when nothing failed. ``--device cpu`` runs the same code on the CPU (two gloo
processes for check 3) with tiny sizes: the smoke test keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.prepare import PrepareParams, SyntheticParams, prepare  # noqa: E402
from pipeline.train.grid import Run  # noqa: E402
from pipeline.train.loop import train  # noqa: E402
from pipeline.train.params import TrainParams  # noqa: E402


def _run(work: Path, data: Path, method: str, params: TrainParams, device: str) -> dict:
    """One training; its images/s (mean over epochs after the first) and encoder weights."""
    d = work / f"{method}-{params.processes}"
    started = time.perf_counter()
    train(params, Run(method), 0, data, None, d / "encoder.pt", d / "state.pt",
          d / "history.csv", d / "loss.png", device)
    seconds = time.perf_counter() - started
    ck = torch.load(d / "encoder.pt", weights_only=False)
    rates = [r["images_per_s"] for r in ck["history"]]
    return {"rate": sum(rates[1:]) / max(len(rates) - 1, 1) if len(rates) > 1 else rates[0],
            "seconds": seconds, "encoder": ck["encoder"], "loss": ck["history"][-1]["loss"]}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a
               if a[k].is_floating_point())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a smoke run")
    ap.add_argument("--images", type=int, default=4096, help="synthetic training images")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--backbone", default="resnet18_cifar", help="train.backbone")
    ap.add_argument("--tolerance", type=float, default=5e-2,
                    help="largest weight difference accepted between 1 and 2 devices")
    ap.add_argument("--skip-tests", action="store_true", help="skip pytest -m gpu")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("FAIL no CUDA device visible (torch.cuda.is_available() is False)")
        return 1
    gpus = torch.cuda.device_count() if cuda else 0
    print(f"# torch {torch.__version__}, {gpus} GPU(s)"
          + "".join(f"; cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(gpus)))
    failed = False

    if a.skip_tests or not cuda:
        print("SKIP pytest -m gpu" + (" (--skip-tests)" if a.skip_tests else " (CPU run)"))
    else:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                              cwd=ROOT, capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        failed |= proc.returncode != 0
        print(f"{'PASS' if proc.returncode == 0 else 'FAIL'} pytest -m gpu: {last}")
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-2000:])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        classes = 8
        prepare(PrepareParams(name="synthetic", test_fraction=0.2, synthetic=SyntheticParams(
            classes=classes, per_class=int(a.images / 0.8 / classes) + 1, size=a.size,
            channels=3)), work / "prepared")
        base = dict(backbone=a.backbone, epochs=a.epochs, batch_size=a.batch_size,
                    warmup_epochs=1, checkpoint_every=a.epochs, knn_monitor=0)
        for method in ("byol", "nnclr"):
            one = _run(work / "one", work / "prepared", method, TrainParams(**base), a.device)
            print(f"PASS 1 {'GPU' if cuda else 'CPU process'} {method}: {one['rate']:.0f} "
                  f"images/s, final loss {one['loss']:.4f}, {one['seconds']:.1f} s")
            if cuda and gpus < 2:
                print(f"SKIP 2-GPU {method}: only {gpus} GPU visible")
                continue
            synced = dict(base, sync_batchnorm=True)
            ref = _run(work / "ref", work / "prepared", method,
                       TrainParams(**synced), a.device)
            two = _run(work / "two", work / "prepared", method,
                       TrainParams(**synced, processes=2), a.device)
            diff = _max_diff(ref["encoder"], two["encoder"])
            ok = diff <= a.tolerance
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'} 2 {'GPUs' if cuda else 'CPU processes'} "
                  f"{method}: {two['rate']:.0f} images/s against {ref['rate']:.0f} on one "
                  f"(x{two['rate'] / ref['rate']:.2f}); largest weight difference {diff:.2e} "
                  f"(tolerance {a.tolerance:g}); loss {two['loss']:.4f} against "
                  f"{ref['loss']:.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
