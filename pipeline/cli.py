"""The ``nnbyol`` command: run an experiment's DAG, build its report, embed image files.

A thin layer over Snakemake and ``python -m pipeline``: ``run`` and ``report`` do what
``make run`` and ``make report`` do, ``embed`` is ``python -m pipeline embed-images``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline import PipelineError

TARGET = "results/linear_eval.csv"
PROFILES = Path("workflow") / "profiles"


class UsageError(Exception):
    """A mistake in how the command was called: one line on stderr, exit status 1."""


def _root(directory: Path | None) -> Path:
    root = Path.cwd() if directory is None else Path(directory)
    if not (root / "Snakefile").is_file():
        raise UsageError(f"{root.resolve()} is not the project root (no Snakefile): run nnbyol "
                         "from the folder with the Snakefile, or pass --directory")
    return root


def _config(config: Path | None, root: Path) -> str:
    """The config file as Snakemake (run in ``root``) should get it: as given, relative to
    the current folder, or the project's config.yaml."""
    path = root / "config.yaml" if config is None else Path(config)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    resolved = path.resolve()
    return (str(resolved.relative_to(root.resolve()))
            if resolved.is_relative_to(root.resolve()) else str(resolved))


def _profile(name: str | None, root: Path) -> list[str]:
    if name is None:
        return []  # Snakemake loads profiles/default by itself
    if not (root / PROFILES / name / "config.yaml").is_file():
        known = sorted(p.name for p in (root / PROFILES).iterdir() if p.is_dir())
        raise UsageError(f"no profile {name!r} in {PROFILES}; use one of: {', '.join(known)}")
    return ["--workflow-profile", str(PROFILES / name)]


def _snakemake(args: list[str], root: Path) -> int:
    """Snakemake of this interpreter, in ``root``; the rules' ``python -m pipeline`` finds the
    same environment first on PATH, activated or not. Returns Snakemake's exit status."""
    print("+ snakemake " + shlex.join(args), file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.call([sys.executable, "-m", "snakemake", *args], cwd=root, env=env)


def _build(a: argparse.Namespace, extra: list[str]) -> tuple[int, Path, str]:
    """Run (or dry-run) the experiment's DAG; returns the exit status, root and config."""
    root = _root(a.directory)
    config = _config(a.config, root)
    # The target goes before --configfile, which takes several values and would swallow it.
    args = ["--cores", a.cores, TARGET, *_profile(a.profile, root),
            *(["--dry-run"] if a.dry_run else []), *extra, "--configfile", config]
    return _snakemake(args, root), root, config


def run(a: argparse.Namespace, extra: list[str]) -> int:
    """``nnbyol run``: the experiment's DAG up to its results table."""
    return _build(a, extra)[0]


def report(a: argparse.Namespace, extra: list[str]) -> int:
    """``nnbyol report``: ``make report``, the DAG then Snakemake's HTML report in the
    experiment's folder; prints where the report is."""
    status, root, config = _build(a, extra)
    if status:
        return status
    found = subprocess.run([sys.executable, "-m", "pipeline", "experiment-dir", config],
                           cwd=root, capture_output=True, text=True)
    if found.returncode:
        sys.stderr.write(found.stderr)
        return found.returncode
    html = Path(found.stdout.strip()) / "report.html"
    if a.dry_run:
        print(f"report (not written, dry run): {(root / html).resolve()}")
        return 0
    status = _snakemake(["--report", str(html), "--configfile", config], root)
    if status == 0:
        print(f"report: {(root / html).resolve()}")
    return status


def embed(a: argparse.Namespace, extra: list[str]) -> int:
    """``nnbyol embed``: ``python -m pipeline embed-images``."""
    a.fn(a)
    return 0


def parser() -> argparse.ArgumentParser:
    from pipeline.__main__ import stage_parser

    p = argparse.ArgumentParser(
        prog="nnbyol", description="Run an experiment's DAG, build its report, embed image "
                                   "files with a trained encoder.",
        epilog="Each command's options: nnbyol <command> --help.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    dag = argparse.ArgumentParser(add_help=False)
    dag.add_argument("config", nargs="?", type=Path, default=None, metavar="CONFIG",
                     help="the experiment's config file (default: the project's config.yaml)")
    dag.add_argument("--cores", default="all", metavar="N",
                     help="CPU cores Snakemake may use at once, a number or 'all' "
                          "(default: %(default)s)")
    dag.add_argument("--profile", default=None, metavar="NAME",
                     help="a Snakemake profile of workflow/profiles, e.g. 'slurm' to submit the "
                          "jobs to SLURM (default: the local profile 'default')")
    dag.add_argument("--dry-run", action="store_true",
                     help="show the jobs that would run, run none")
    dag.add_argument("--directory", type=Path, default=None, metavar="DIR",
                     help="the project root, the folder with the Snakefile (default: the "
                          "current folder)")
    usage = ("%(prog)s [CONFIG] [--cores N] [--profile NAME] [--dry-run] [--directory DIR] "
             "[-- SNAKEMAKE_ARG ...]")
    passed = "Arguments after '--' go to Snakemake's run of the DAG as they are, e.g. "

    s = sub.add_parser(
        "run", parents=[dag], usage=usage, help="run an experiment: train, evaluate, tabulate",
        description=f"Run the experiment's DAG up to {TARGET} (snakemake --cores N "
                    f"{TARGET} --configfile CONFIG). Only out-of-date jobs run.",
        epilog=passed + "nnbyol run experiments/mine/config.yaml --cores 8 -- --keep-going")
    s.set_defaults(command_fn=run)

    s = sub.add_parser(
        "report", parents=[dag], usage=usage,
        help="run an experiment and build its HTML report",
        description="Run the experiment's DAG as 'run' does, then write Snakemake's HTML report "
                    "into the experiment's folder (results/<tag>/report.html) and print its "
                    "path ('make report').",
        epilog=passed + "nnbyol report --cores 8 -- --keep-going")
    s.set_defaults(command_fn=report)

    images = stage_parser("embed-images")
    s = sub.add_parser(
        "embed", parents=[images], add_help=False, description=images.description,
        help="features of your own image files with an encoder.pt, to Parquet")
    s.set_defaults(command_fn=embed)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nnbyol`` console command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:  # the rest goes to Snakemake untouched
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = parser()
    a = p.parse_args(argv)
    if extra and a.command == "embed":
        p.error("arguments after '--' are for Snakemake (run and report only)")
    try:
        return a.command_fn(a, extra)
    except (UsageError, PipelineError) as e:
        print(f"nnbyol: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"nnbyol: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nnbyol: interrupted; a re-run resumes trainings from their last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
