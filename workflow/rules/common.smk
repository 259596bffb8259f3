# Config validation and helpers shared by every rule file. Rules only wire files; the
# helpers here build paths, flat stage params and the experiment grid.

import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from pipeline import PipelineError
from pipeline.config import (
    as_param,
    build,
    byol_params,
    read_config_file,
    evaluate_params,
    latent_params,
    neighbours_params,
    prepare_params,
    resolve_config,
    run_name,
    VARIANTS as ALL_VARIANTS,
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
VARIANTS = config["byol"]["variants"]
SEEDS = config["byol"]["seeds"]
SOURCES = config["byol"]["sources"]
ROUNDS = config["byol"]["refresh_rounds"]
# Every registered variant but the baseline uses neighbours (a wildcard regex).
NEIGHBOUR_VARIANTS = "|".join(v for v in ALL_VARIANTS if v != "baseline")


wildcard_constraints:
    model=r"[a-z]+",
    metric=r"euclidean|cosine",
    space=r"[a-z]+",
    seed=r"\d+",
    run=r"[a-z0-9-]+",


def sources(*names):
    """A stage's own source files, as inputs, so that editing them re-runs the stage."""
    return [str(SRC / name) for name in names]


def params_of(kind, *args):
    """One stage's params as a sorted JSON string (Snakemake compares params by repr)."""
    makers = {
        "prepare": prepare_params,
        "latent": latent_params,
        "neighbours": neighbours_params,
        "byol": byol_params,
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


def byol_runs():
    """BYOL run names of the grid: the baseline, and each neighbour variant per source: per
    latent space and metric (and refresh round), and online."""
    runs = []
    for variant in VARIANTS:
        if variant == "baseline":
            runs.append(run_name("byol", "baseline"))
            continue
        if "latent" in SOURCES:
            runs += [run_name("byol", variant, m, d, r) for m in LATENTS for d in METRICS
                     for r in range(1, ROUNDS + 1)]
        if "online" in SOURCES:
            runs.append(run_name("byol", variant, "online"))
    return runs


def byol_dir(run, seed):
    return os.path.join(R, "byol", run.removeprefix("byol-"), f"seed{seed}")


def neighbours_source(wildcards):
    """Raw-pixel neighbours read the prepared set; the others a latent export."""
    if wildcards.space == "pixels":
        return f"{R}/data.npz"
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
    runs = [eval_json(run_name("pixels"))]
    runs += [eval_json(run_name("latent", latent=m)) for m in LATENTS]
    if config["evaluate"]["untrained"]:
        runs += [eval_json("byol-untrained", s) for s in SEEDS]
    runs += [eval_json(r, s) for r in byol_runs() for s in SEEDS]
    return runs


def byol_histories(wildcards):
    """Per-epoch history of every trained BYOL run and seed (for the overlaid curves)."""
    return [os.path.join(byol_dir(r, s), "history.csv") for r in byol_runs() for s in SEEDS]


def report_inputs(wildcards):
    """Everything the HTML report shows, so `snakemake --report` finds it built."""
    figures = [f"{R}/latent/{m}/{f}.png" for m in LATENTS for f in ("loss", "recon")]
    figures += [f"{R}/neighbours/{s}-{m}/grid.png" for s in SPACES for m in METRICS]
    figures += [os.path.join(byol_dir(r, s), "loss.png") for r in byol_runs() for s in SEEDS]
    figures += [f"{R}/{f}.png" for f in ("accuracy", "paired_difference", "accuracy_vs_purity",
                                         "per_class", "embeddings", "byol_histories")]
    tables = ["linear_eval.csv", "summary.csv", "linear_eval.html", "summary.html",
              "overview.rst"]
    return figures + purity_table(wildcards) + [f"{R}/{t}" for t in tables]


def latent_cfg(wildcards):
    return params_of("latent", wildcards.model)


def untrained_cfg():
    """The untrained control depends only on the architecture, not on training keys."""
    flat = byol_params(config, "baseline")
    return as_param({k: flat[k] for k in ("backbone", "proj_dim", "proj_hidden")})


def byol_cfg(source):
    """A BYOL rule's params function; ``source`` is its neighbour source."""

    def cfg(wildcards):
        return params_of("byol", wildcards.variant, source)

    return cfg


def refreshed_from(wildcards):
    """The BYOL run whose encoder's features a refresh round mines: the previous round."""
    return run_name("byol", wildcards.variant, wildcards.model, wildcards.metric,
                    int(wildcards.round) - 1).removeprefix("byol-")


def refresh_features(wildcards):
    return os.path.join(byol_dir(refreshed_from(wildcards), wildcards.seed), "features.parquet")


def byol_encoder(wildcards):
    return os.path.join(byol_dir(wildcards.run, wildcards.seed), "encoder.pt")
