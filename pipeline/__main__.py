"""Command line: ``python -m pipeline <stage> ...``; each stage calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import PipelineError

PREPARED = "the prepared folder (results/<tag>/prepared)"  # the --data of most stages


def _params(cls, text: str):
    from pipeline.schema import build

    try:
        flat = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"--params is not valid JSON: {e}") from None
    return build(cls, flat)


def _prepare(a):
    from pipeline.prepare import PrepareParams, prepare

    prepare(_params(PrepareParams, a.params), a.out)


def _check_data(a):
    from pipeline.prepare import check_data

    check_data(a.data, a.out, a.k, a.queue_size)


def _train_latent(a):
    from pipeline.latent.loop import train_latent
    from pipeline.latent.params import LatentParams

    train_latent(_params(LatentParams, a.params), a.model, a.data, a.out, a.curve,
                 a.loss_plot, a.recon_plot, a.device)


def _export_latents(a):
    from pipeline.latent.export import export_latents

    export_latents(a.checkpoint, a.data, a.out, a.device, a.dataset)


def _neighbours(a):
    from pipeline.neighbours import NeighboursParams, find_neighbours

    find_neighbours(_params(NeighboursParams, a.params), a.source, a.data, a.metric, a.out,
                    a.grid, a.device)


def _purity(a):
    from pipeline.neighbours import purity_table

    purity_table(a.inputs, a.out)


def _train(a):
    from pipeline.train.grid import Run
    from pipeline.train.loop import train
    from pipeline.train.params import TrainParams

    # Several seeds train one after another in one process (train.seeds_in_one_job): a small
    # run's imports cost about as much as its training. Each seed has its own files; one
    # --neighbours (a latent space's) may serve them all.
    n = len(a.seed)
    if len(set(a.seed)) != n:
        raise PipelineError(f"train: --seed {' '.join(map(str, a.seed))} repeats a seed")
    neighbours = a.neighbours or [None]
    files = {"neighbours": neighbours * n if len(neighbours) == 1 else neighbours,
             "out": a.out, "state": a.state, "history": a.history, "loss-plot": a.loss_plot}
    for name, values in files.items():
        if len(values) != n:
            raise PipelineError(f"train: {n} --seed and {len(values)} --{name} values; give "
                                f"one per --seed")
        if name != "neighbours" and len(set(values)) != n:
            raise PipelineError(f"train: --{name} names a file twice; each seed writes its own")
    run = Run(a.method, a.use, a.source, a.space, a.metric, a.round)
    params = _params(TrainParams, a.params)
    for i, seed in enumerate(a.seed):
        train(params, run, seed, a.data, *(files[k][i] for k in files), a.device)


def _untrained(a):
    from pipeline.train.encoder import write_untrained

    write_untrained(a.backbone, a.seed, a.data, a.out)


def _embed(a):
    from pipeline.embed import embed

    embed(a.encoder, a.data, a.out, a.run, a.dataset, a.device)


def _embed_images(a):
    from pipeline.embed import embed_files

    embed_files(a.encoder, a.images, a.out, a.device, a.batch_size, a.chunk)


def _evaluate(a):
    from pipeline.evaluate import EvaluateParams, evaluate_sources

    # One process evaluates a run's seeds: its imports (torch, scikit-learn) cost more than
    # probing a small set, so a job per seed would mostly start interpreters.
    seeds = a.seed or [None] * len(a.source)
    if not len(a.source) == len(a.out) == len(seeds):
        raise PipelineError(f"evaluate: {len(a.source)} --source, {len(a.out)} --out and "
                            f"{len(a.seed or [])} --seed values; give one --out (and one "
                            f"--seed, if any) per --source")
    evaluate_sources(_params(EvaluateParams, a.params), a.run, a.source, a.data, a.out,
                     a.dataset, seeds, a.device)


def _aggregate(a):
    from pipeline.aggregate import aggregate

    aggregate(a.inputs, a.out, a.purity, a.summary, a.table_html, a.summary_html, a.overview,
              a.data)


def _combine(a):
    from pipeline.aggregate import combine

    combine(a.current, a.out)


def _figures(a):
    from pipeline.figures import report_figures

    report_figures(a.summary, a.data, a.evals, a.histories, a.accuracy, a.paired,
                   a.purity, a.curves, a.per_class, a.embeddings)


def _experiment_dir(a):
    from pipeline.config import read_config_file, resolve_config
    from pipeline.experiments import experiment_tag

    config = resolve_config(read_config_file(a.config))
    print(f"results/{experiment_tag(config, [a.config])}")


def _config_docs(a):
    from pipeline.configdocs import write_config_docs

    write_config_docs(a.out)


def _readme_table(a):
    from pipeline.readme import update_readme

    current = update_readme(a.summary, a.readme, a.keep, check=a.check)
    if a.check and not current:
        raise PipelineError(f"{a.readme}'s results table differs from {a.summary}; run "
                            f"python -m pipeline readme-table {a.summary}")
    print(f"{a.readme}: results table {'current' if current else 'rewritten'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and FAISS")
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name, fn, *, params=False, device=False):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        if params:
            s.add_argument("--params", required=True, help="stage params as one JSON object")
            s.add_argument("--runtime", default="{}",
                           help="settings that do not change results (chunk size, checkpoint "
                                "interval), as one JSON object merged into --params")
        if device:
            s.add_argument("--device", default="auto",
                           help="auto (CUDA when present), cpu or cuda[:N]")
        return s

    s = stage("experiment-dir", _experiment_dir)
    s.add_argument("config", type=Path, help="the config file, as given to --configfile")

    s = stage("config-docs", _config_docs)
    s.add_argument("--out", type=Path, required=True,
                   help="the configuration reference to write (docs/configuration.md)")

    s = stage("readme-table", _readme_table)
    s.add_argument("summary", type=Path, help="the run's summary.csv (results/digits/summary.csv)")
    s.add_argument("--readme", type=Path, default=Path("README.md"),
                   help="the file whose results block to rewrite")
    s.add_argument("--keep", type=Path, default=Path("docs/results/digits-summary.csv"),
                   help="where to keep the summary the table came from (named in the table)")
    s.add_argument("--check", action="store_true",
                   help="only compare: exit 2 when the table differs from the summary")

    s = stage("prepare", _prepare, params=True)
    s.add_argument("--out", type=Path, required=True,
                   help="the prepared folder to write (images.npy, meta.parquet)")

    s = stage("check-data", _check_data)
    s.add_argument("--data", type=Path, required=True, help=PREPARED)
    s.add_argument("--out", type=Path, required=True,
                   help="the marker JSON written when the checks pass (data_checked.json)")
    s.add_argument("--k", type=int, default=None, help="neighbours.k, when neighbours are mined")
    s.add_argument("--queue-size", type=int, default=None,
                   help="train.queue.queue_size, when the queue source is used")

    s = stage("train-latent", _train_latent, params=True, device=True)
    s.add_argument("--model", required=True, help="the latent model: autodecoder, ae or vae")
    for name, text in (("data", PREPARED), ("out", "the model checkpoint to write (model.pt)"),
                       ("curve", "the per-epoch loss table to write (loss.csv)"),
                       ("loss-plot", "the loss curve PNG to write"),
                       ("recon-plot", "the PNG of images and reconstructions to write")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)

    s = stage("export-latents", _export_latents, device=True)
    for name, text in (("checkpoint", "a latent model's model.pt"), ("data", PREPARED),
                       ("out", "the latents.parquet to write: one latent vector per image")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)
    s.add_argument("--dataset", required=True,
                   help="the experiment's tag (results/<tag>), recorded in the metadata")

    s = stage("neighbours", _neighbours, params=True, device=True)
    s.add_argument("--metric", required=True, help="euclidean or cosine")
    for name, text in (("source", "the vectors to search: a latents.parquet, an encoder's "
                                  "features.parquet, or the prepared folder (raw pixels)"),
                       ("data", PREPARED),
                       ("out", "the neighbours.parquet to write: k per training image"),
                       ("grid", "the PNG of example images and their neighbours to write")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)

    s = stage("purity", _purity)
    s.add_argument("--out", type=Path, required=True, help="the purity.csv to write")
    s.add_argument("inputs", nargs="+", type=Path, help="neighbours.parquet files")

    s = stage("train", _train, params=True, device=True)
    s.add_argument("--method", required=True, help="a key of pipeline.train.methods.METHODS")
    s.add_argument("--use", default="baseline", help="a neighbour use (pipeline.train.uses)")
    s.add_argument("--source", default="", choices=["", "latent", "refresh", "queue"],
                   help="where the use finds neighbours (none for the baseline)")
    s.add_argument("--space", default="", help="latent model whose space was mined")
    s.add_argument("--metric", default="", help="the neighbours' metric")
    s.add_argument("--round", type=int, default=1, help="refresh round (1 = latent)")
    s.add_argument("--seed", type=int, nargs="+", required=True,
                   help="fixes initialisation, batch order, augmentations, neighbour draws; "
                        "several train one after another, each with its own files below")
    s.add_argument("--neighbours", type=Path, nargs="+", default=None,
                   help="neighbours.parquet of the latent or refresh source: one, or one per "
                        "--seed")
    s.add_argument("--data", type=Path, required=True, help=PREPARED)
    for name, text in (("out", "the encoder.pt to write"),
                       ("state", "the resumable checkpoint (state.pt), resumed from when it "
                                 "matches"),
                       ("history", "the per-epoch history.csv to write"),
                       ("loss-plot", "the loss curve PNG to write")):
        s.add_argument(f"--{name}", type=Path, nargs="+", required=True,
                       help=f"{text}; one per --seed")

    s = stage("untrained", _untrained)
    s.add_argument("--backbone", required=True, help="train.backbone (auto: by image side)")
    s.add_argument("--seed", type=int, required=True, help="the initialisation's seed")
    for name, text in (("data", PREPARED), ("out", "the encoder.pt to write")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)

    s = stage("embed", _embed, device=True)
    s.add_argument("--run", required=True, help="the run's name, recorded as the model")
    s.add_argument("--dataset", required=True,
                   help="the experiment's tag (results/<tag>), recorded in the metadata")
    for name, text in (("encoder", "an encoder.pt"), ("data", PREPARED),
                       ("out", "the features.parquet to write (latents.parquet schema)")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)

    s = stage("embed-images", _embed_images)
    s.description = ("Features of your own image files with any encoder.pt, written to Parquet "
                     "(path, feature) in bounded memory, with a progress line on stderr.")
    s.add_argument("--encoder", type=Path, required=True,
                   help="an encoder.pt, e.g. results/<tag>/train/<run>/seed<N>/encoder.pt")
    s.add_argument("--images", type=Path, required=True,
                   help="a folder of image files (recursive, hidden files skipped) or a "
                        ".tar/.tar.gz of them; each becomes grey or RGB by prepare's rules "
                        "and is resized to the encoder's square side: aspect ratio not kept")
    s.add_argument("--out", type=Path, required=True,
                   help="the Parquet file to write: one row per image, columns path (relative "
                        "to the folder, or the member name) and feature (float32 list)")
    s.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    s.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass of the encoder (default: %(default)s)")
    s.add_argument("--chunk", type=int, default=None,
                   help="images decoded, encoded and written at a time, one Parquet row "
                        "group; bounds memory (default: pipeline.io.CHUNK, 4096)")

    s = stage("evaluate", _evaluate, params=True, device=True)
    s.add_argument("--run", required=True,
                   help="the row's run name: pixels, latent-vae, byol-baseline, ...")
    s.add_argument("--dataset", required=True, help="the experiment's tag, the dataset column")
    s.add_argument("--seed", type=int, nargs="+", default=None,
                   help="the run's seed per --source (a column; the probe's random_state)")
    s.add_argument("--source", type=Path, nargs="+", required=True,
                   help="what to evaluate: the prepared folder (raw pixels), a latents.parquet "
                        "or an encoder.pt; several (one per seed) share one process")
    s.add_argument("--data", type=Path, required=True, help=PREPARED)
    s.add_argument("--out", type=Path, nargs="+", required=True,
                   help="the metrics JSON to write, one per --source")

    s = stage("aggregate", _aggregate)
    s.add_argument("--out", type=Path, required=True, help="the experiment's results table")
    s.add_argument("--purity", type=Path, default=None, help="neighbours purity table")
    s.add_argument("--data", type=Path, default=None,
                   help="the prepared folder, for the image counts")
    for name, text in (("summary", "the summary.csv to write: each configuration over seeds"),
                       ("table-html", "the results table's HTML page to write"),
                       ("summary-html", "the summary's HTML page to write"),
                       ("overview", "the report's data-set overview (RST) to write")):
        s.add_argument(f"--{name}", type=Path, default=None, help=text)
    s.add_argument("inputs", nargs="+", type=Path, help="metrics JSON files, one per row")

    s = stage("combine", _combine)
    s.add_argument("--current", type=Path, required=True, help="this experiment's table")
    s.add_argument("--out", type=Path, required=True,
                   help="table of every experiment: --current plus each <out dir>/*/<name>")

    s = stage("figures", _figures)
    for name, text in (("summary", "aggregate's summary.csv"), ("data", PREPARED),
                       ("accuracy", "PNG to write: accuracy per representation"),
                       ("paired", "PNG to write: paired differences to the baselines"),
                       ("purity", "PNG to write: accuracy against neighbour purity"),
                       ("curves", "PNG to write: the training histories"),
                       ("per-class", "PNG to write: per-class accuracy"),
                       ("embeddings", "PNG to write: test images in 2-D (PCA)")):
        s.add_argument(f"--{name}", type=Path, required=True, help=text)
    s.add_argument("--evals", nargs="+", type=Path, required=True,
                   help="metrics JSON files (evaluate's)")
    s.add_argument("--histories", nargs="*", type=Path, default=[],
                   help="history.csv files of the trained runs")
    return p


def stage_parser(name: str) -> argparse.ArgumentParser:
    """One stage's parser (its options, help and function), for the ``nnbyol`` command to
    take as a parent, so that both commands accept the same options."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.threads import set_threads

    set_threads(args.threads)
    try:
        if getattr(args, "runtime", "{}") != "{}":
            # Kept apart from --params so that Snakemake's params trigger never sees them.
            args.params = json.dumps({**json.loads(args.params), **json.loads(args.runtime)})
        args.fn(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a quota, a permission: the file and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {args.stage}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every job of the terminal's process group
        print(f"error: {args.stage} interrupted; a re-run resumes trainings from their last "
              "checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
