"""Latent-model throughput per layout, and what the auto-decoder's test-code inference costs.

    .venv/bin/python bench/bench_latent.py --threads 1 --size 28 --layouts channels_last contiguous
    .venv/bin/python bench/bench_latent.py --threads 1 --infer-steps 100 20 10 0  # + inference

(1) Training: images/s of one optimiser step of each latent model (``net.loss``, backward,
Adam) on random uint8 images of the given size, for each memory layout side by side (the
pipeline uses ``pipeline.device.LAYOUT``), with the floating-point rate the step reaches
(FLOPs counted by torch's FlopCounterMode). (2) With ``--infer-steps``: the auto-decoder is
trained on digits with the default latent params, then the codes of the test images are
inferred from each start (``ridge``: :class:`pipeline.latent.models.RidgeStart`; ``zero``:
the prior mean) with each step count; printed are the inference's wall time in training
epochs (of the same run, same process) and the test images' reconstruction MSE.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.augment import to_float  # noqa: E402
from pipeline.latent.models import LATENT_MODELS, RidgeStart, build_model  # noqa: E402

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def train_rate(model: str, shape: tuple[int, int, int], layout: torch.memory_format,
               args: argparse.Namespace) -> tuple[float, float]:
    """(images/s, GFLOP/s) of training steps of ``model`` on random images of ``shape``."""
    torch.manual_seed(0)
    net = build_model(model, shape, args.dim, args.width, args.batch_size).to(
        memory_format=layout)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    images = torch.randint(0, 256, (args.batch_size, *shape), dtype=torch.uint8)
    index = torch.arange(args.batch_size)

    def step() -> None:
        loss, _ = net.loss(to_float(images).contiguous(memory_format=layout), index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t0
    return args.steps * args.batch_size / seconds, counter.get_total_flops() * args.steps / seconds


def inference_cost(args: argparse.Namespace) -> None:
    """Train the auto-decoder on digits, then time and score test-code inference."""
    from pipeline.latent import LatentParams, load_checkpoint, train_latent
    from pipeline.latent.models import mse_per_image
    from pipeline.prepare import PrepareParams, prepare

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(PrepareParams(name="digits"), work / "prepared")
        params = LatentParams(epochs=args.epochs)
        train_latent(params, "autodecoder", work / "prepared", work / "ad.pt", work / "c.csv",
                     work / "l.png", work / "r.png", "cpu")
        net, state = load_checkpoint(work / "ad.pt", torch.device("cpu"))
    epoch = min(h["seconds"] for h in state["history"])
    x = to_float(torch.from_numpy(data.images[data.split == "test"]))
    position = {int(i): r for r, i in enumerate(state["train_ids"].tolist())}
    train = torch.from_numpy(data.images[[int(i) in position for i in data.ids]])
    codes = net.codes.weight.detach()[[position[int(i)] for i in data.ids
                                        if int(i) in position]]
    print(f"auto-decoder on digits, {params.epochs} epochs of {len(train)} images (fastest "
          f"epoch {epoch:.3f} s); inference of {len(x)} test codes, Adam lr "
          f"{params.infer_lr}; seconds include the ridge fit:")
    print(f"{'start':<7}{'steps':>6}{'seconds':>10}{'epochs':>8}{'test MSE':>10}")
    for start in args.infer_starts:
        for steps in args.infer_steps:
            t0 = time.perf_counter()
            z0 = RidgeStart(train, codes)(x) if start == "ridge" else None
            z = net.infer(x, steps, params.infer_lr, z0)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                mse = mse_per_image(net.decoder(z), x).mean().item()
            print(f"{start:<7}{steps:>6}{seconds:>10.3f}{seconds / epoch:>8.2f}{mse:>10.5f}",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28, help="image side for (1)")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=list(LATENT_MODELS), choices=LATENT_MODELS)
    ap.add_argument("--layouts", nargs="+", default=["channels_last", "contiguous"],
                    choices=list(LAYOUTS))
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--infer-steps", type=int, nargs="*", default=[],
                    help="(2): auto-decoder inference step counts to time on digits")
    ap.add_argument("--infer-starts", nargs="+", default=["ridge", "zero"],
                    choices=["ridge", "zero"], help="(2): where inference starts")
    ap.add_argument("--epochs", type=int, default=30, help="(2): auto-decoder training epochs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.size, args.size, args.channels)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'model':<13}{'shape':<10}{'layout':<15}{'img/s':>8}{'GFLOP/s':>9}{'x first':>9}")
    for model in args.models:
        first = None
        for name in args.layouts:
            rate, flops = train_rate(model, shape, LAYOUTS[name], args)
            first = first or rate
            print(f"{model:<13}{'x'.join(map(str, shape)):<10}{name:<15}{rate:>8.0f}"
                  f"{flops / 1e9:>9.1f}{rate / first:>9.2f}", flush=True)
    if args.infer_steps:
        inference_cost(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
