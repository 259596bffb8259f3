"""Side by side against lightly: lightly's BYOL recipe and ours, same data, model, epochs and
machine, in one run (optional: needs `pip install -e ".[cpu,peer]"`, i.e. lightly).

    .venv/bin/python bench/bench_lightly.py --epochs 20 --threads 2      # digits
    .venv/bin/python bench/bench_lightly.py --npz my.npz --epochs 20     # x_train, y_train, ...
    .venv/bin/python bench/bench_lightly.py --folder imgs --resize 28    # imgs/{train,test}/<class>
    .venv/bin/python bench/bench_lightly.py --data results/cifar10-cpu/prepared --epochs 10
    .venv/bin/python bench/bench_lightly.py --arms ours --epochs 2       # without lightly
    .venv/bin/python bench/bench_lightly.py --precision bf16             # our step in bf16

Data: scikit-learn's digits by default; ``--npz`` and ``--folder`` are read by the pipeline's
own ``npz`` and ``imagefolder`` readers (``pipeline.prepare``, the same checks and error
messages; a folder may be a tar(.gz)), ``--data`` takes a file the pipeline already prepared.

Both arms train the same backbone (``pipeline.backbones``, ``auto`` for the image size) with
the same batch size, epochs, projector/predictor sizes and seed:

* ``lightly``: lightly's BYOL example loop: ``BYOLTransform`` (PIL/torchvision transforms per
  image) in DataLoader workers, ``BYOLProjectionHead``/``BYOLPredictionHead``,
  ``NegativeCosineSimilarity``, ``update_momentum`` with ``cosine_schedule``, SGD lr 0.06 as in
  lightly's example; crop scale, flips and normalisation set as ours for this data set.
* ``ours``: ``pipeline.train.loop.train`` of the ``byol-baseline`` run, with the config this
  data set gets (the schema defaults, or the digits preset).

Every ``--probe-every`` epochs both encoders are probed with the pipeline's linear probe
(``pipeline.evaluate.linear_probe`` on frozen, unaugmented features of the prepared
train/test split); probing is outside the timed training. Printed per arm: images/s, training
wall time, final linear top-1, and the training time until the arm's first probe at or above
lightly's final top-1 (lightly's own can come before its last epoch); then the ratios.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import PipelineError  # noqa: E402
from pipeline.augment import normalise, to_float  # noqa: E402
from pipeline.config import field_schema  # noqa: E402
from pipeline.evaluate import linear_probe  # noqa: E402
from pipeline.io import TRAINING_SPLITS, Prepared, load_prepared  # noqa: E402

INSTALL = 'pip install -e ".[cpu,peer]"'


def load_data(args: argparse.Namespace, workdir: Path) -> Prepared:
    """The data set the arguments name, prepared by the pipeline's readers (digits if none)."""
    if args.data is not None:
        return load_prepared(args.data)
    from pipeline.prepare import PrepareParams, prepare

    if args.npz is not None:
        params = PrepareParams(name="npz", root=str(args.npz))
    elif args.folder is not None:
        params = PrepareParams(name="imagefolder", root=str(args.folder), resize=args.resize)
    else:
        params = PrepareParams(name="digits")
    return prepare(params, workdir / "prepared")


class Prober:
    """Linear top-1 of an encoder's frozen features on the prepared split."""

    def __init__(self, data: Prepared, mean: torch.Tensor, std: torch.Tensor):
        train = data.subset(*TRAINING_SPLITS)
        keep = train.labels >= 0
        self.train_x, self.train_y = train.images[keep], train.labels[keep]
        test = data.subset("test")
        self.test_x, self.test_y = test.images, test.labels
        self.n_classes = int(data.labels.max()) + 1
        self.mean, self.std = mean, std

    def _features(self, encoder: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), 1024):
            x = to_float(torch.from_numpy(images[start:start + 1024]))
            out.append(encoder(normalise(x, self.mean, self.std)).float())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def top1(self, encoder: torch.nn.Module) -> float:
        was_training = encoder.training
        encoder.eval()
        scores = linear_probe(self._features(encoder, self.train_x), self.train_y,
                              self._features(encoder, self.test_x), self.n_classes)
        encoder.train(was_training)
        return float((scores.argmax(1) == self.test_y).mean())


def our_params(digits: bool, epochs: int, batch: int | None, backbone: str,
               precision: str = "auto"):
    """Our BYOL baseline's params, as the pipeline resolves them: the digits preset for
    digits, the schema defaults for any other data set; ``precision`` is ``train.precision``."""
    from pipeline.config import build, resolve_config
    from pipeline.train.grid import Run, train_params
    from pipeline.train.params import TrainParams

    cfg = resolve_config({"train": {"precision": precision},
                          **({} if digits else {"preset": "none"})})
    p = build(TrainParams, train_params(cfg, Run("byol")))
    p.epochs, p.backbone, p.checkpoint_every = epochs, backbone, epochs
    p.batch_size = batch or p.batch_size
    return p


def run_ours(data_path: Path, params, seed: int, prober: Prober, probe_every: int,
             workdir: Path) -> dict:
    import csv

    from pipeline.train.grid import Run
    from pipeline.train.loop import train

    probes = {}

    def on_epoch(epoch, encoder):
        if epoch % probe_every == 0 or epoch == params.epochs:
            probes[epoch] = prober.top1(encoder)

    d = workdir / "ours"
    start = time.perf_counter()
    train(params, Run("byol"), seed, data_path, None, d / "encoder.pt", d / "state.pt",
          d / "history.csv", d / "loss.png", "cpu", on_epoch=on_epoch)
    wall = time.perf_counter() - start
    with open(d / "history.csv") as fh:
        seconds = np.cumsum([float(r["seconds"]) for r in csv.DictReader(fh)])
    return {"probes": probes, "train_seconds": list(seconds), "wall": wall}


def run_lightly(data: Prepared, params, seed: int, prober: Prober, probe_every: int,
                workers: int) -> dict:
    """lightly's BYOL example loop (Python/PIL transforms in DataLoader workers)."""
    try:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.transforms.byol_transform import (
            BYOLTransform,
            BYOLView1Transform,
            BYOLView2Transform,
        )
        from lightly.utils.scheduler import cosine_schedule
    except ImportError:
        raise PipelineError(f"the lightly arm needs lightly: {INSTALL}") from None
    import copy

    from PIL import Image

    from pipeline.backbones import build_backbone

    train = data.subset(*TRAINING_SPLITS)
    _, size, _, channels = train.images.shape
    norm = {"mean": prober.mean.tolist(), "std": prober.std.tolist()}
    if channels == 1:
        norm = {"mean": norm["mean"] * 3, "std": norm["std"] * 3}
    common = dict(input_size=size, min_scale=params.view1.crop_min_scale,
                  hf_prob=params.view1.flip_prob, normalize=norm)
    transform = BYOLTransform(BYOLView1Transform(**common), BYOLView2Transform(**common))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(train.images)

        def __getitem__(self, i):
            img = Image.fromarray(train.images[i].squeeze(-1) if channels == 1
                                  else train.images[i]).convert("RGB")
            views = transform(img)
            return [v[:channels] if channels == 1 else v for v in views]

    torch.manual_seed(seed)
    backbone = build_backbone(params.backbone, channels, size)
    projector = BYOLProjectionHead(backbone.out_dim, params.proj_hidden, params.proj_dim)
    predictor = BYOLPredictionHead(params.proj_dim, params.proj_hidden, params.proj_dim)
    backbone_t, projector_t = copy.deepcopy(backbone), copy.deepcopy(projector)
    deactivate_requires_grad(backbone_t)
    deactivate_requires_grad(projector_t)
    online = torch.nn.ModuleList([backbone, projector, predictor])
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.06)
    loader = torch.utils.data.DataLoader(Images(), batch_size=params.batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    probes, seconds, total = {}, [], 0.0
    start = time.perf_counter()
    for epoch in range(params.epochs):
        t0 = time.perf_counter()
        m = cosine_schedule(epoch, params.epochs, 0.996, 1)
        for x0, x1 in loader:
            update_momentum(backbone, backbone_t, m=m)
            update_momentum(projector, projector_t, m=m)
            p0 = predictor(projector(backbone(x0)))
            p1 = predictor(projector(backbone(x1)))
            with torch.no_grad():
                z0, z1 = projector_t(backbone_t(x0)), projector_t(backbone_t(x1))
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        total += time.perf_counter() - t0
        seconds.append(total)
        if (epoch + 1) % probe_every == 0 or epoch + 1 == params.epochs:
            probes[epoch + 1] = prober.top1(backbone)
    return {"probes": probes, "train_seconds": seconds, "wall": time.perf_counter() - start}


def time_to(result: dict, target: float) -> float | None:
    """Training seconds until the first probe at or above ``target`` (None: never)."""
    for epoch, acc in sorted(result["probes"].items()):
        if acc >= target - 1e-12:
            return result["train_seconds"][epoch - 1]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--npz", type=Path, default=None,
                        help="an .npz with x_train, y_train, x_test, y_test (NHW or NHWC)")
    source.add_argument("--folder", type=Path, default=None,
                        help="<folder>/{train,test}/<class>/<image> (or a tar(.gz) of it)")
    source.add_argument("--data", type=Path, default=None,
                        help="a prepared prepared (results/<tag>/prepared); default: digits")
    ap.add_argument("--resize", type=int, default=None, help="--folder images to NxN pixels")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: what the pipeline uses for this data set")
    ap.add_argument("--backbone", default="auto")
    ap.add_argument("--precision", default="auto",
                    choices=field_schema("train", "precision")[1]["enum"],
                    help="train.precision of our arm (lightly's runs in fp32)")
    ap.add_argument("--probe-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=None, help="keep N training images, "
                    "drawn at random (seeded by --seed)")
    ap.add_argument("--arms", nargs="+", default=["lightly", "ours"],
                    choices=["lightly", "ours"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipeline.backbones import build_backbone, resolve_backbone
    from pipeline.io import save_prepared
    from pipeline.train.encoder import channel_stats

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = load_data(args, work)
        if args.max_train is not None:
            # A seeded random subset: readers may store the images sorted by class.
            train = np.flatnonzero(np.isin(data.split, TRAINING_SPLITS))
            train = np.random.default_rng(args.seed).permutation(train)[:args.max_train]
            keep = np.sort(np.concatenate([train, np.flatnonzero(data.split == "test")]))
            data = Prepared(data.images[keep], data.labels[keep], data.split[keep],
                            data.ids[keep], data.classes)
        save_prepared(work / "bench.npz", data)
        _, size, _, channels = data.images.shape
        digits = args.data is None and args.npz is None and args.folder is None
        params = our_params(digits, args.epochs, args.batch_size,
                            resolve_backbone(args.backbone, size), args.precision)
        mean, std = channel_stats(data.subset(*TRAINING_SPLITS).images)
        prober = Prober(data, torch.as_tensor(mean, dtype=torch.float32),
                        torch.as_tensor(std, dtype=torch.float32))
        n = int(np.isin(data.split, TRAINING_SPLITS).sum())
        torch.manual_seed(args.seed)
        untrained = prober.top1(build_backbone(params.backbone, channels, size))
        results = {}
        for arm in args.arms:
            if arm == "ours":
                results[arm] = run_ours(work / "bench.npz", params, args.seed, prober,
                                        args.probe_every, work)
            else:
                results[arm] = run_lightly(data, params, args.seed, prober,
                                           args.probe_every, args.workers)
    target = results["lightly"]["probes"][args.epochs] if "lightly" in results else None
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {n} training images {size}x{size}x{channels}, "
          f"{params.backbone}, batch {params.batch_size}, {args.epochs} epochs, "
          f"seed {args.seed}, our precision {args.precision}")
    print(f"{'arm':<8} {'img/s':>8} {'train s':>8} {'wall s':>8} {'top-1':>7} "
          f"{'s to lightly top-1':>18}  probes (epoch: top-1)")
    steps = n // params.batch_size * params.batch_size
    for arm, r in results.items():
        train_s = r["train_seconds"][-1]
        reach = time_to(r, target) if target is not None else None
        probes = " ".join(f"{e}:{a:.3f}" for e, a in sorted(r["probes"].items()))
        print(f"{arm:<8} {steps * args.epochs / train_s:>8.0f} {train_s:>8.1f} "
              f"{r['wall']:>8.1f} {r['probes'][args.epochs]:>7.4f} "
              f"{'-' if target is None else 'never' if reach is None else f'{reach:.1f}':>18}"
              f"  {probes}")
    print(f"untrained {params.backbone} (random init, seed {args.seed}): top-1 {untrained:.4f}")
    if len(results) == 2:
        ours, peer = results["ours"], results["lightly"]
        reach, peer_reach = time_to(ours, target), time_to(peer, target)
        peer_full = peer["train_seconds"][-1]
        print(f"ours/lightly images/s: {peer_full / ours['train_seconds'][-1]:.2f}")
        if reach is None:
            print("time to lightly's final top-1: ours never reached it")
        else:
            print(f"time to lightly's final top-1: {peer_reach / reach:.2f}x less (against "
                  f"lightly's first probe at or above it), {peer_full / reach:.2f}x less "
                  "(against lightly's full run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
