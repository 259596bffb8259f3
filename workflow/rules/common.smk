# Config validation and helpers shared by every rule file. Rules only wire files; the
# helpers here build paths, flat stage params and the experiment grid.

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from pipeline import PipelineError
from pipeline.config import (
    as_param,
    build,
    byol_params,
    dataset_tag,
    evaluate_params,
    latent_params,
    neighbours_params,
    prepare_params,
    run_name,
    validate_config,
)
from pipeline.prepare import PrepareParams, check_source

from snakemake.exceptions import WorkflowError

try:
    _checked = validate_config(config)
    check_source(build(PrepareParams, prepare_params(_checked)))
except PipelineError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(_checked)

DS = dataset_tag(config)
R = f"results/{DS}"
LOGS = f"{R}/logs"
SRC = Path(workflow.basedir) / "pipeline"
ENV = "../envs/nnbyol.yaml"
# Every job runs `python -m pipeline` with the interpreter running snakemake, and the
# workflow's own copy of the package first on the path (also for a copy outside the repo).
shell.prefix(
    f"export PATH={Path(sys.executable).parent}:$PATH"
    f" PYTHONPATH={workflow.basedir}:$PYTHONPATH; "
)
DEVICE = config["device"]
# GPU stages ask for one GPU unless the config pins the CPU; under `auto` only when this
# host shows one (set device: cuda to request GPUs from a cluster with CPU-only login nodes).
GPU = 0 if DEVICE == "cpu" else int(DEVICE.startswith("cuda") or bool(shutil.which("nvidia-smi")))


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


def eval_json(run, seed=None):
    if seed is None:
        return os.path.join(R, "eval", f"{run}.json")
    return os.path.join(R, "eval", run, f"seed{seed}.json")


def linear_eval_inputs(wildcards):
    """Every metrics JSON of the experiment grid, plus the cheap reference rows."""
    return [eval_json(run_name("pixels"))]
