"""Command line: ``python -m pipeline <stage> ...``; each stage calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import PipelineError


def _params(cls, text: str):
    from pipeline.config import build

    try:
        flat = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"--params is not valid JSON: {e}") from None
    return build(cls, flat)


def _prepare(a):
    from pipeline.prepare import PrepareParams, prepare

    prepare(_params(PrepareParams, a.params), a.out)


def _train_latent(a):
    from pipeline.latent import LatentParams, train_latent

    train_latent(_params(LatentParams, a.params), a.model, a.data, a.out, a.curve,
                 a.loss_plot, a.recon_plot, a.device)


def _export_latents(a):
    from pipeline.latent import export_latents

    export_latents(a.checkpoint, a.data, a.out, a.device, a.dataset)


def _neighbours(a):
    from pipeline.neighbours import NeighboursParams, find_neighbours

    find_neighbours(_params(NeighboursParams, a.params), a.source, a.data, a.metric, a.out,
                    a.grid, a.device)


def _purity(a):
    from pipeline.neighbours import purity_table

    purity_table(a.inputs, a.out)


def _byol(a):
    from pipeline.byol import ByolParams, train_byol

    train_byol(_params(ByolParams, a.params), a.variant, a.seed, a.data, a.neighbours, a.out,
               a.state, a.history, a.loss_plot, a.device, untrained=a.untrained)


def _evaluate(a):
    from pipeline.evaluate import EvaluateParams, evaluate

    evaluate(_params(EvaluateParams, a.params), a.run, a.source, a.data, a.out, a.dataset,
             a.seed, a.device)


def _aggregate(a):
    from pipeline.aggregate import aggregate

    aggregate(a.inputs, a.out, a.purity)


def _accuracy_chart(a):
    from pipeline.plots import accuracy_chart

    accuracy_chart(a.table, a.out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and FAISS")
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name, fn, *, params=False, device=False):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        if params:
            s.add_argument("--params", required=True, help="stage params as one JSON object")
        if device:
            s.add_argument("--device", default="auto")
        return s

    s = stage("prepare", _prepare, params=True)
    s.add_argument("--out", type=Path, required=True)

    s = stage("train-latent", _train_latent, params=True, device=True)
    s.add_argument("--model", required=True)
    for name in ("data", "out", "curve", "loss-plot", "recon-plot"):
        s.add_argument(f"--{name}", type=Path, required=True)

    s = stage("export-latents", _export_latents, device=True)
    for name in ("checkpoint", "data", "out"):
        s.add_argument(f"--{name}", type=Path, required=True)
    s.add_argument("--dataset", required=True)

    s = stage("neighbours", _neighbours, params=True, device=True)
    s.add_argument("--metric", required=True)
    for name in ("source", "data", "out", "grid"):
        s.add_argument(f"--{name}", type=Path, required=True)

    s = stage("purity", _purity)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("inputs", nargs="+", type=Path)

    s = stage("byol", _byol, params=True, device=True)
    s.add_argument("--variant", required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--neighbours", type=Path, default=None)
    s.add_argument("--untrained", action="store_true", help="write the initial encoder only")
    for name in ("data", "out", "state", "history", "loss-plot"):
        s.add_argument(f"--{name}", type=Path, required=True)

    s = stage("evaluate", _evaluate, params=True, device=True)
    s.add_argument("--run", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--seed", type=int, default=None)
    for name in ("source", "data", "out"):
        s.add_argument(f"--{name}", type=Path, required=True)

    s = stage("aggregate", _aggregate)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--purity", type=Path, default=None, help="neighbours purity table")
    s.add_argument("inputs", nargs="+", type=Path)

    s = stage("accuracy-chart", _accuracy_chart)
    s.add_argument("--table", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.device import set_threads

    set_threads(args.threads)
    try:
        args.fn(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
