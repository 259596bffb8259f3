# Config validation and helpers shared by every rule file. Rules only wire files; the
# helpers here build paths, flat stage params and the experiment grid.

import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from pipeline import PipelineError
from pipeline.codeinputs import module_files, stage_module
from pipeline.config import (
    as_param,
    build,
    read_config_file,
    evaluate_params,
    latent_params,
    neighbours_params,
    prepare_params,
    resolve_config,
    runtime_params,
)
from pipeline.experiments import (
    check_owner,
    check_report,
    experiment_tag,
    record_owner,
    report_path,
)
from pipeline.prepare import PrepareParams, check_source
from pipeline.train.grid import runs as grid_runs, train_params


# A --configfile replaces config.yaml instead of being merged over it (Snakemake's default),
# so another experiment never inherits the embedded digits experiment's grid.
_USER_FILES = [str(f) for f in workflow.overwrite_configfiles]
_user = dict(workflow.config_settings.overwrite_config) if _USER_FILES else dict(config)
# The config file that owns this experiment's folder (the last --configfile, else config.yaml).
_CONFIG_FILE = (_USER_FILES or [str(f) for f in workflow.configfiles] or ["config.yaml"])[-1]
try:
    # Snakemake keeps the last of a key given twice; a config file gets one line instead.
    read_config_file(_CONFIG_FILE)
    _checked = resolve_config(_user)
    check_source(build(PrepareParams, prepare_params(_checked)))
    DS = experiment_tag(_checked, _USER_FILES)
    R = f"results/{DS}"
    if workflow.is_main_process:
        # Before any job: another config's folder is refused, a report shows this config's.
        check_owner(R, _CONFIG_FILE, _checked)
        _REPORT = report_path(sys.argv)
        if _REPORT is not None:
            check_report(_REPORT, R, _CONFIG_FILE, f"{R}/linear_eval.csv")
except PipelineError as error:
    # One line naming the key, before any traceback-shaped framing.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
config.clear()
config.update(_checked)


onstart:
    # Only a run that starts jobs claims the folder (never a dry run or a report).
    if workflow.is_main_process:
        record_owner(R, _CONFIG_FILE, config)


LOGS = f"{R}/logs"
SRC = Path(workflow.basedir) / "pipeline"
ENV = "../envs/nnbyol.yaml"
# Every job runs `python -m pipeline` with the interpreter running snakemake, and the
# workflow's own copy of the package first on the path (also for a copy outside the repo).
# A prefix replaces Snakemake's default one, so it restates strict mode; both folders are
# quoted because a checkout path may hold spaces or `$(...)`, and every brace is doubled
# because Snakemake formats the prefix like a rule's command.
_PREFIX = (
    "set -euo pipefail; "
    f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""
    f" PYTHONPATH={shlex.quote(workflow.basedir)}\"${{PYTHONPATH:+:$PYTHONPATH}}\"; "
)
shell.prefix(_PREFIX.replace("{", "{{").replace("}", "}}"))
DEVICE = config["device"]
# GPU stages ask for one GPU unless the config pins the CPU; under `auto` only when this
# host shows one (set device: cuda to request GPUs from a cluster with CPU-only login nodes).
GPU = 0 if DEVICE == "cpu" else int(DEVICE.startswith("cuda") or bool(shutil.which("nvidia-smi")))
# Threads of a training job. Small CPU nets scale poorly across threads, so on a small machine
# several single-threaded jobs beat one wide job; torch and FAISS honour this number.
HEAVY = max(1, min(4, (os.cpu_count() or 2) // 2))

LATENTS = config["latent"]["models"]
METRICS = config["neighbours"]["metrics"]
SPACES = LATENTS + (["pixels"] if config["neighbours"]["pixels"] else [])
SEEDS = config["train"]["seeds"]
# Every trained configuration of the grid, by name (the registry the rules look runs up in).
RUNS = {r.name: r for r in grid_runs(config)}


wildcard_constraints:
    model=r"[a-z]+",
    metric=r"euclidean|cosine",
    space=r"[a-z]+",
    seed=r"\d+",
    run=r"[a-z0-9-]+",


def code_of(command):
    """A stage's source files, as inputs, so that editing one re-runs the stage: the modules
    its CLI handler imports and every ``pipeline`` module they import in turn."""
    return module_files(*stage_module(command), root=Path(workflow.basedir))


def params_of(kind, *args):
    """One stage's params as a sorted JSON string (Snakemake compares params by repr)."""
    makers = {
        "prepare": prepare_params,
        "latent": latent_params,
        "neighbours": neighbours_params,
        "evaluate": evaluate_params,
    }
    return as_param(makers[kind](config, *args))


def runtime_of(stage):
    """A stage's runtime-only settings (chunk size, checkpoint interval) as a params function.

    Snakemake counts a params function that takes ``input`` as derived and leaves it out of
    its params rerun trigger, so changing these never re-runs finished jobs.
    """

    def runtime(wildcards, input):
        return as_param(runtime_params(config, stage))

    return runtime


def eval_json(run, seed=None):
    if seed is None:
        return os.path.join(R, "eval", f"{run}.json")
    return os.path.join(R, "eval", run, f"seed{seed}.json")


def train_dir(run, seed):
    return os.path.join(R, "train", run, f"seed{seed}")


def neighbours_source(wildcards):
    """Raw-pixel neighbours read the prepared set; the others a latent export."""
    if wildcards.space == "pixels":
        return f"{R}/prepared"
    return f"{R}/latent/{wildcards.space}/latents.parquet"


def purity_inputs(wildcards):
    return [f"{R}/neighbours/{s}-{m}/neighbours.parquet" for s in SPACES for m in METRICS]


def purity_table(wildcards):
    """The purity table, when any neighbours are mined at all."""
    return [f"{R}/neighbours/purity.csv"] if SPACES and METRICS else []


def purity_flag(wildcards):
    return " ".join(f"--purity {p}" for p in purity_table(wildcards))


def linear_eval_inputs(wildcards):
    """Every metrics JSON of the experiment grid, plus the cheap reference rows."""
    runs = [eval_json("pixels")]
    runs += [eval_json(f"latent-{m}") for m in LATENTS]
    if config["evaluate"]["untrained"]:
        runs += [eval_json("untrained", s) for s in SEEDS]
    runs += [eval_json(r, s) for r in RUNS for s in SEEDS]
    return runs


def train_histories(wildcards):
    """Per-epoch history of every trained run and seed (for the overlaid curves)."""
    return [os.path.join(train_dir(r, s), "history.csv") for r in RUNS for s in SEEDS]


def report_inputs(wildcards):
    """Everything the HTML report shows, so `snakemake --report` finds it built."""
    figures = [f"{R}/latent/{m}/{f}.png" for m in LATENTS for f in ("loss", "recon")]
    figures += [f"{R}/neighbours/{s}-{m}/grid.png" for s in SPACES for m in METRICS]
    figures += [os.path.join(train_dir(r, s), "loss.png") for r in RUNS for s in SEEDS]
    figures += [f"{R}/{f}.png" for f in ("accuracy", "paired_difference", "accuracy_vs_purity",
                                         "per_class", "embeddings", "train_histories")]
    tables = ["linear_eval.csv", "summary.csv", "linear_eval.html", "summary.html",
              "overview.rst"]
    return figures + purity_table(wildcards) + [f"{R}/{t}" for t in tables]


def latent_cfg(wildcards):
    return params_of("latent", wildcards.model)


def run_of(wildcards):
    """The grid's run of a training job, looked up by name."""
    if wildcards.run not in RUNS:
        raise PipelineError(f"no run {wildcards.run!r} in this experiment's grid")
    return RUNS[wildcards.run]


def train_cfg(wildcards):
    return as_param(train_params(config, run_of(wildcards)))


def train_neighbours(wildcards):
    """The neighbours file of an offline source: mined once in a latent space, or in the
    features of the run's previous refresh round; none for a baseline or the queue."""
    run = run_of(wildcards)
    if run.source == "latent":
        return [f"{R}/neighbours/{run.space}-{run.metric}/neighbours.parquet"]
    if run.source == "refresh":
        return [f"{R}/neighbours/refresh/{run.name}/seed{wildcards.seed}/neighbours.parquet"]
    return []


def train_args(wildcards, input):
    """The run's method, use and source as command-line flags."""
    run = run_of(wildcards)
    args = f"--method {run.method} --use {run.use}"
    if run.source:
        args += f" --source {run.source} --round {run.round}"
        args += f" --space {run.space} --metric {run.metric}" if run.space else ""
    return args + "".join(f" --neighbours {n}" for n in input.neighbours)


def refresh_features(wildcards):
    """The features a refresh round mines: the previous round's encoder's."""
    run = RUNS[wildcards.run].previous()
    return os.path.join(train_dir(run.name, wildcards.seed), "features.parquet")


def neighbours_metric(wildcards):
    """The metric of a neighbours job: its wildcard, or a refresh round's run's metric."""
    if "metric" in wildcards.keys():
        return wildcards.metric
    return RUNS[wildcards.run].metric


def train_encoder(wildcards):
    return os.path.join(train_dir(wildcards.run, wildcards.seed), "encoder.pt")
