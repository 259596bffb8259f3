"""Benchmark: training step throughput with on-device augmentation vs model-only vs a CPU recipe.

    python bench/bench_byol.py --device cuda --batch-size 256 --steps 50        # the GPU figures
    python bench/bench_byol.py --device cpu --batch-size 64 --steps 5 --cases resnet18_cifar:32 \\
        smallconv:8 --workers 1                                                 # CPU side by side
    python bench/bench_byol.py --methods byol simclr nnclr                      # methods' steps
    python bench/bench_byol.py --accuracy --epochs 30                           # digits top-1

(a) end to end: uint8 data resident on the device, per-sample augmentation there, the method's
training step (BYOL by default; ``--methods`` puts registered methods side by side);
(b) model only: the same step on one batch already on the device (no augmentation);
``views``: (a)'s two augmented views alone, no step (images/s of augmentation);
(c) CPU recipe: torchvision.transforms.v2 per sample in DataLoader workers, then the same step;
``loader``: those workers alone, no step (the ceiling of (c)). Both paths draw the pipeline's
default views (BYOL's asymmetric blur/solarisation, which every method trains on). Ratios a/b
and a/c are printed per case; ``--layouts`` and ``--precisions`` put memory layouts and
``train.precision`` side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.augment import AugmentParams, augment, normalise, to_float  # noqa: E402
from pipeline.config import field_schema  # noqa: E402
from pipeline.device import LAYOUT  # noqa: E402
from pipeline.train.encoder import init_encoder  # noqa: E402
from pipeline.train.grid import METHOD_USES  # noqa: E402
from pipeline.train.loop import autocast_for, step_dtype  # noqa: E402
from pipeline.train.methods import METHODS, build_method  # noqa: E402
from pipeline.train.optim import make_optimizer  # noqa: E402
from pipeline.train.params import TrainParams  # noqa: E402
from pipeline.train.uses import USES, Batch  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
PRECISIONS = field_schema("train", "precision")[1]["enum"]  # train.precision's values


def _model(method, backbone, channels, size, dev, layout, precision):
    """``method`` (a registry key) around a seeded ``backbone``, with the schema defaults'
    head sizes and method keys, its optimiser and the step's autocast."""
    defaults = TrainParams()
    encoder = init_encoder(backbone, 0, channels, size)
    model = build_method(method, encoder, defaults.proj_hidden, defaults.proj_dim,
                         getattr(defaults, method)).to(dev, memory_format=layout)
    opt = make_optimizer("lars" if backbone.startswith("resnet") else "adamw",
                         model.trainable(), 0.01, 1e-6)
    return model, opt, autocast_for(precision, dev)


def train_step(model, opt, batch: Batch, idx: torch.Tensor, g: torch.Generator,
               autocast) -> None:
    """One baseline step as ``pipeline.train.loop`` takes it: the method's loss under
    autocast, backward, the optimiser, then the method's own update (BYOL's EMA at
    ``byol.tau_base``, NNCLR's enqueue)."""
    with autocast:
        out = model.loss(batch.v1, batch.v2, idx, g)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    model.after_step(out, idx, 0, 1)


def _timed(fn, steps, warmup, dev):
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    return time.perf_counter() - t0


class _TwoViews(torch.utils.data.Dataset):
    """The CPU recipe: torchvision v2 transforms per image, one pipeline per view, with the
    same probabilities, blur kernel and sigma range as ``pipeline.augment``."""

    def __init__(self, images: np.ndarray, p1: AugmentParams, p2: AugmentParams):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 NCHW
        self.tf = [self._recipe(images.shape[1], p) for p in (p1, p2)]

    @staticmethod
    def _recipe(size: int, p: AugmentParams):
        from torchvision.transforms import v2

        s = p.jitter_strength
        kernel = max(3, int(0.1 * size) | 1)
        scale = max(size / 224.0, 0.25)
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(p.crop_min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(p.flip_prob),
            v2.RandomApply([v2.ColorJitter(s, s, s, s / 4)], p=p.jitter_prob),
            v2.RandomGrayscale(p.grayscale_prob),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.GaussianBlur(kernel, (0.1 * scale, 2.0 * scale))],
                           p=p.blur_prob),
            v2.RandomSolarize(0.5, p=p.solarize_prob),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return self.tf[0](x), self.tf[1](x)


def bench_case(backbone, channels, size, args, dev, layout=LAYOUT, precision="auto",
               mode="eager", method="byol"):
    """Images/s of (a), (b), (c) for one backbone and image size, models and batches in
    ``layout`` (the pipeline's own by default), ``method``'s step in ``precision``
    (``train.precision``). The views are the pipeline's default ones (BYOL's asymmetric blur
    and solarisation); ``mode`` ``compile`` runs the encoder through ``torch.compile``, as
    ``train.compile`` does."""
    n = max(args.batch_size * 4, 2048)
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    model, opt, autocast = _model(method, backbone, channels, size, dev, layout, precision)
    views = TrainParams()
    aug1, aug2 = views.view1, views.view2
    mean = torch.full((channels,), 0.5, device=dev)
    std = torch.full((channels,), 0.25, device=dev)

    def prep(x):
        return normalise(x, mean, std).contiguous(memory_format=layout)

    images = torch.from_numpy(images_np).to(dev)
    g = torch.Generator().manual_seed(0)  # a CPU generator, as the training loop uses
    bsz = args.batch_size
    rows = torch.arange(bsz, device=dev)  # the anchors' rows (NNCLR's queue records them)

    @torch.no_grad()
    def views():
        idx = torch.randint(n, (bsz,), generator=g).to(dev)
        x = to_float(images[idx])
        return Batch(prep(augment(x, aug1, g)), prep(augment(x, aug2, g)))

    def views_only():
        views()
        _sync(dev)

    def e2e():
        train_step(model, opt, views(), rows, g, autocast)

    fixed = Batch(prep(to_float(images[:bsz])), prep(to_float(images[bsz:2 * bsz])))

    def model_only():
        train_step(model, opt, fixed, rows, g, autocast)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # one eager step: the same arithmetic as the compiled one
        model_only()
    if mode == "compile":
        model.encoder.forward = torch.compile(model.encoder.forward)

    if args.e2e_only:  # one process of a --placements run: when its timed steps ran
        for _ in range(args.warmup):
            e2e()
        start = time.time()
        for _ in range(args.steps):
            e2e()
        return {"start": start, "end": time.time()}

    loader = torch.utils.data.DataLoader(
        _TwoViews(images_np, aug1, aug2), batch_size=bsz, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=dev.type == "cuda",
        persistent_workers=args.workers > 0)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def cpu_recipe():
        v1, v2 = next_batch()
        b = Batch(prep(v1.to(dev, non_blocking=True)), prep(v2.to(dev, non_blocking=True)))
        train_step(model, opt, b, rows, g, autocast)

    # (a), (b), the two views alone, (c) and the recipe's ceiling (its workers with no model
    # step competing for the cores), timed in turn ``--repeats`` times; the medians, so that
    # a slow spell of a shared machine hits all of them alike.
    paths = {"a": e2e, "b": model_only, "views": views_only, "c": cpu_recipe,
             "loader": next_batch}
    seconds = {k: [] for k in paths}
    for _ in range(args.repeats):
        for key, fn in paths.items():
            seconds[key].append(_timed(fn, args.steps, args.warmup, dev))
    res = {k: args.steps * bsz / statistics.median(v) for k, v in seconds.items()}
    res["gflops"] = counter.get_total_flops() * res["b"] / bsz / 1e9
    return res


def gemm_rate(dev: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n x n matrix product on ``dev`` in ``dtype``."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = _timed(lambda: a @ b, reps, 1, dev)
    return 2 * n**3 * reps / seconds / 1e9


def parse_case(case: str) -> tuple[str, int, int]:
    """``backbone:side[:channels]`` -> (backbone, side, channels; 3 for ResNets, else 1)."""
    parts = case.split(":")
    backbone, size = parts[0], int(parts[1])
    return backbone, size, int(parts[2]) if len(parts) > 2 else (
        3 if backbone.startswith("resnet") else 1)


def placement(case: str, spec: str, args) -> float:
    """Aggregate end-to-end images/s of ``P`` processes of ``T`` threads each (``spec`` PxT),
    running at once: how the DAG's concurrent single-threaded jobs compare with fewer, wider
    ones on the same cores."""
    procs, threads = (int(v) for v in spec.split("x"))
    cmd = [sys.executable, __file__, "--device", "cpu", "--threads", str(threads),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--cases", case, "--precisions", args.precisions[0],
           "--methods", args.methods[0], "--e2e-only"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    spans = []
    for run in runs:
        out, _ = run.communicate()
        if run.returncode:
            raise SystemExit(f"placement {spec}: a worker failed ({' '.join(cmd)})")
        spans.append(json.loads(out.splitlines()[-1]))
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return procs * args.steps * args.batch_size / wall


def accuracy(args):
    """Digits linear top-1 of the untrained encoder and of each method with each neighbour
    use it takes (pixel-space neighbours)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import build, resolve_config
    from pipeline.evaluate import linear_probe
    from pipeline.io import TRAINING_SPLITS, load_prepared
    from pipeline.prepare import PrepareParams, prepare
    from pipeline.train.encoder import encode_checkpoint, write_untrained
    from pipeline.train.grid import Run, train_params
    from pipeline.train.loop import train

    tmp = Path(tempfile.mkdtemp(prefix="bench_byol_"))
    prepare(PrepareParams(max_train=args.max_train), tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    train_set = data.subset(*TRAINING_SPLITS)
    # Neighbours in pixel space (euclidean, k=5): a stand-in for the latent-space stage.
    x = train_set.images.reshape(len(train_set.images), -1).astype(np.float32)
    sq = (x * x).sum(1)
    d = np.maximum(sq[:, None] - 2 * x @ x.T + sq[None], 0)
    np.fill_diagonal(d, np.inf)
    k = 5
    nn_idx = np.argsort(d, 1)[:, :k]
    purity = float((train_set.labels[nn_idx[:, 0]] == train_set.labels).mean())
    ids = train_set.ids
    pq.write_table(pa.table({
        "id": pa.array(ids),
        "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(ids[nn_idx].ravel()), k),
        "distances": pa.FixedSizeListArray.from_arrays(
            pa.array(np.sqrt(np.take_along_axis(d, nn_idx, 1)).ravel().astype(np.float32)), k),
    }).replace_schema_metadata({"metric": "euclidean", "k": str(k),
                                "purity_at_1": str(purity)}), tmp / "nb.parquet")
    tr = (data.split == "train") & (data.labels >= 0)
    te = data.split == "test"
    uses = [u for u in args.uses if u != "untrained"]
    # The config a digits experiment with these methods and uses gets (its preset under the
    # user's train keys), validated as the workflow validates it.
    cfg = resolve_config({"train": {**json.loads(args.params), "epochs": args.epochs,
                                    "methods": args.methods, "uses": uses or ["baseline"]}})
    runs = [Run(m) if u == "baseline" else Run(m, u, "latent", "pixels", "euclidean")
            for m in args.methods for u in uses if u in METHOD_USES[m]]
    print(f"digits, pixel-space neighbours k={k} (purity@1 {purity:.3f}), "
          f"{args.epochs} epochs, train {args.params} over the digits preset, seeds {args.seeds}")
    rows = [("untrained", None)] if "untrained" in args.uses else []
    rows += [(f"{r.method}-{r.use}", r) for r in runs]
    for label, run in rows:
        params = build(TrainParams, train_params(cfg, run or Run(args.methods[0])))
        accs, secs = [], []
        for seed in args.seeds:
            out = tmp / f"{label}-{seed}.pt"
            t0 = time.time()
            if run is None:
                write_untrained(params.backbone, seed, tmp / "prepared", out)
            else:
                train(params, run, seed, tmp / "prepared",
                      tmp / "nb.parquet" if run.source else None, out,
                      tmp / f"{label}-{seed}-state.pt", tmp / "h.csv", tmp / "l.png",
                      args.device)
            secs.append(time.time() - t0)
            f, _ = encode_checkpoint(out, data, args.device)
            probs = linear_probe(f[tr], data.labels[tr], f[te], len(data.classes), seed=seed)
            accs.append(float((probs.argmax(1) == data.labels[te]).mean()))
        print(f"  {label:<22} top1 {np.mean(accs):.4f} +- {np.std(accs):.4f}  "
              f"({np.mean(secs):.1f} s/run)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time (a), (b), the views, (c) and the loader in turn this many "
                         "times; medians")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers for (c)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", nargs="+", default=["resnet18_cifar:32"],
                    help="backbone:side[:channels] pairs, e.g. resnet18_cifar:32 smallconv:8:1")
    ap.add_argument("--layouts", nargs="+", default=["channels_last"], choices=list(LAYOUTS),
                    help="memory layouts of model and batches, side by side (the pipeline "
                         "uses channels_last)")
    ap.add_argument("--precisions", nargs="+", default=["auto"], choices=PRECISIONS,
                    help="train.precision values side by side (auto: bf16 on CUDA, fp32 on "
                         "CPU)")
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"],
                    help="eager and/or torch.compile'd encoder, side by side")
    ap.add_argument("--methods", nargs="+", default=["byol"], choices=list(METHODS),
                    help="training methods side by side (their baseline step); for "
                         "--accuracy, the methods to train; --placements times the first")
    ap.add_argument("--placements", nargs="+", default=[],
                    help="PxT: P processes of T threads each at once, (a) only, aggregate "
                         "img/s (e.g. 1x2 2x1 4x1 8x1)")
    ap.add_argument("--gemm-n", type=int, default=2048,
                    help="side of the reference matrix product timed per precision (0: "
                         "none; bf16 on a CPU without bf16 instructions takes minutes)")
    ap.add_argument("--e2e-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--accuracy", action="store_true", help="digits linear top-1 instead")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--params", default="{}",
                    help="for --accuracy: config.yaml's train section as JSON (nested, e.g. "
                         '\'{"precision": "bf16", "augment": {"flip_prob": 0.5}}\'), over the '
                         "digits preset")
    ap.add_argument("--uses", nargs="+", default=["untrained", *USES],
                    choices=["untrained", *USES],
                    help="for --accuracy: untrained and the neighbour uses to train, each with "
                         "every --methods method that takes it")
    ap.add_argument("--max-train", type=int, default=None,
                    help="digits training images for --accuracy (default: all 1,438)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.device import describe, resolve_device

    dev = resolve_device(args.device)
    args.device = str(dev)
    cpu = platform.processor() or platform.machine()
    print(f"# {describe(dev)}, torch {torch.__version__}, {cpu}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}")
    if args.accuracy:
        accuracy(args)
        return
    if args.e2e_only:
        backbone, size, channels = parse_case(args.cases[0])
        print(json.dumps(bench_case(backbone, channels, size, args, dev,
                                    precision=args.precisions[0], method=args.methods[0])))
        return
    if args.placements:
        print(f"{'case':<22}{'placement':<12}{'img/s':>10}{'x first':>9}  (end to end, all "
              f"processes together, {args.methods[0]} step)")
        for case in args.cases:
            first = None
            for spec in args.placements:
                rate = placement(case, spec, args)
                first = first or rate
                print(f"{case:<22}{spec:<12}{rate:>10.0f}{rate / first:>9.2f}", flush=True)
        return
    for precision in args.precisions if args.gemm_n else ():
        dtype = step_dtype(precision, dev)
        print(f"# {str(dtype).removeprefix('torch.')} matrix product {args.gemm_n}^3 on this "
              f"device: {gemm_rate(dev, dtype, args.gemm_n):.0f} GFLOP/s (a reference for "
              "(b)'s rate)")
    print(f"{'case':<22}{'layout':<15}{'precision':<10}{'mode':<9}{'method':<8}{'(a) e2e':>10}"
          f"{'(b) model':>10}{'GFLOP/s':>9}{'views':>9}{'(c) cpu':>10}{'loader':>9}{'a/b':>7}"
          f"{'a/c':>7}{'a/a[0]':>8}")
    for case in args.cases:
        backbone, size, channels = parse_case(case)
        first = None
        for name, precision, mode, method in itertools.product(
                args.layouts, args.precisions, args.modes, args.methods):
            r = bench_case(backbone, channels, size, args, dev, LAYOUTS[name], precision,
                           mode, method)
            first = first or r["a"]
            print(f"{case:<22}{name:<15}{precision:<10}{mode:<9}{method:<8}{r['a']:>10.0f}"
                  f"{r['b']:>10.0f}{r['gflops']:>9.1f}{r['views']:>9.0f}{r['c']:>10.0f}"
                  f"{r['loader']:>9.0f}{r['a'] / r['b']:>7.2f}{r['a'] / r['c']:>7.2f}"
                  f"{r['a'] / first:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
