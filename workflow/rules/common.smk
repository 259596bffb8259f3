# Config validation and helpers shared by every rule file. Rules only wire files; the
# helpers here build paths, flat stage params and the experiment grid.

import errno
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

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
    without_site_keys,
)
from pipeline.experiments import (
    check_owner,
    check_report,
    experiment_tag,
    record_owner,
    report_path,
)
from pipeline.prepare import PrepareParams, check_source
from pipeline.threads import host_gpus, slurm_cpus
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
        check_owner(R, _CONFIG_FILE, without_site_keys(_checked))
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
        record_owner(R, _CONFIG_FILE, without_site_keys(config))


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


# ---- What each job asks the scheduler for (docs/cluster.md) ------------------------------
# The cluster.* keys say it; they feed resources only, never a stage's params or results.
CLUSTER = config["cluster"]
# A cluster executor needs --jobs, which Snakemake keeps as `nodes` (a local run turns it into
# --cores); a job running on a node (slurm-jobstep) is not the main process.
ON_CLUSTER = workflow.nodes is not None or not workflow.is_main_process


def _host_threads():
    """Threads of a heavy CPU job: inside a SLURM job its own grant (what the submitting side
    asked for, so both sides agree), else half this host's cores, at most 4. Small CPU nets
    scale poorly across threads, so on a small machine several single-threaded jobs beat one
    wide job; torch and FAISS honour this number."""
    if not workflow.is_main_process and slurm_cpus():
        return slurm_cpus()
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))


HEAVY = CLUSTER["cpus_per_task"] or _host_threads()


def heavy_threads(gpus):
    """Threads of a heavy stage: cluster.cpus_per_gpu per GPU it uses, else HEAVY."""
    return CLUSTER["cpus_per_gpu"] * gpus if gpus else HEAVY


if workflow.is_main_process and ON_CLUSTER and DEVICE == "auto":
    # `auto` would decide GPU or not on the login node, and again, differently, on each node.
    print("error: config key 'device': auto decides from the submitting host whether jobs "
          "get GPUs; on a cluster set device: cuda (the GPU stages ask for GPUs) or cpu",
          file=sys.stderr)
    sys.exit(1)
if workflow.is_main_process and not ON_CLUSTER:
    # A local run checks the GPUs it asks for against this host, before any job: jobs would
    # otherwise share cuda:0 or wait for slots that never free (pipeline.device.claim_devices).
    _gpus_here = host_gpus()
    _limit = workflow.global_resources.get("gpu")
    _limit = None if _limit is None else _limit.value
    _problem = None
    if isinstance(_limit, int) and _limit > max(1, _gpus_here):
        _problem = (f"--resources gpu={_limit}: this host has {_gpus_here} GPU(s) (nvidia-smi -L);"
                    f" run at most {max(1, _gpus_here)} GPU job(s) at once (--resources gpu="
                    f"{max(1, _gpus_here)})")
    elif DEVICE.startswith("cuda") and _gpus_here == 0:
        _problem = (f"config key 'device': {DEVICE}, but this host has no GPU (nvidia-smi -L "
                    "lists none); use device auto or cpu here, or submit to a cluster "
                    "(--workflow-profile profiles/slurm)")
    if _problem:
        print(f"error: {_problem}", file=sys.stderr)
        sys.exit(1)


def site(gpus):
    """Partition, account and GPU type of a job with ``gpus`` GPUs: the GPU partition only
    for a job that asks for a GPU, the CPU partition for every other (cluster.* keys)."""
    keys = {
        "slurm_partition": CLUSTER["gpu_partition"] if gpus else CLUSTER["cpu_partition"],
        "slurm_account": (CLUSTER["gpu_account"] or CLUSTER["account"]) if gpus
        else CLUSTER["account"],
        "gpu_model": CLUSTER["gpu_model"] if gpus else None,
    }
    return {k: v for k, v in keys.items() if v}


# Throughput each stage is assumed to reach, in images per second of 32x32x3 bytes, per GPU
# and per CPU thread; the host memory it needs beside the data (MB), and how many copies of
# the prepared images it holds. Deliberately low guesses (the CPU ones from
# docs/BENCHMARKS.md, the GPU ones not measured here): a time limit too short kills a job, one
# too long only waits a little longer in the queue. cluster.runtime / cluster.mem_mb replace
# an estimate per rule (the refresh rounds' mining is `neighbours` here, as its rule is).
COST = {
    "train": dict(gpu=500, cpu=20, base_mb=3000, copies=2),
    "train_latent": dict(gpu=2000, cpu=80, base_mb=3000, copies=2),
    "export_latents": dict(gpu=5000, cpu=200, base_mb=3000, copies=2),
    "embed": dict(gpu=5000, cpu=200, base_mb=3000, copies=2),
    "evaluate_train": dict(gpu=2000, cpu=100, base_mb=3000, copies=3),
    # brute-force search: the passes below grow with the set (n / 10,000)
    "neighbours": dict(gpu=20000, cpu=200, base_mb=3000, copies=3),
    # the probe standardises raw pixels as floats (8 bytes each, fit and copy)
    "evaluate_pixels": dict(gpu=0, cpu=500, base_mb=2000, copies=16),
}
_RULE_NAMES = set()
for _smk in Path(workflow.basedir, "workflow", "rules").glob("*.smk"):
    for _names in re.findall(r"^(?:rule\s+(\w+)\s*:|use\s+rule\s+\w+\s+as\s+(\w+)\s+with\s*:)",
                             _smk.read_text(), flags=re.M):
        _RULE_NAMES.update(n for n in _names if n)
for _key in ("runtime", "mem_mb"):
    _unknown = sorted(set(CLUSTER[_key]) - _RULE_NAMES)
    if _unknown:
        print(f"error: config key 'cluster.{_key}': {', '.join(map(repr, _unknown))} is not "
              f"a rule here; the rules are {', '.join(sorted(_RULE_NAMES))}", file=sys.stderr)
        sys.exit(1)


def _prepared(input):
    """(images, bytes per image) of a job's prepared set, from images.npy's header."""
    path = Path(input.data) / "images.npy"
    if not path.is_file():
        # Not prepared yet: Snakemake shows <TBD> and asks again once `prepare` has run.
        raise FileNotFoundError(errno.ENOENT, "not prepared yet", str(input.data))
    images = np.load(path, mmap_mode="r")
    return images.shape[0], images.itemsize * math.prod(images.shape[1:])


def _passes(name, images):
    if name == "train":
        return config["train"]["epochs"] * (len(SEEDS) if SEEDS_IN_ONE_JOB else 1)
    if name == "train_latent":
        return config["latent"]["epochs"]
    if name.startswith("neighbours"):
        return max(1.0, images / 10_000)
    if name == "evaluate_train":
        return len(SEEDS)
    return 1


def minutes(name, gpus=0, processes=1):
    """A rule's time limit (minutes) as a resource function: the prepared set's images x
    epochs at the rule's assumed throughput, plus 5 minutes to start, times
    cluster.safety_factor, times the attempt."""

    def runtime(wildcards, input, threads, attempt):
        if name in CLUSTER["runtime"]:
            return CLUSTER["runtime"][name] * attempt
        images, size = _prepared(input)
        cost = COST[name]
        rate = cost["gpu"] * gpus * processes if gpus else cost["cpu"] * threads * processes
        seconds = images * size / 3072 * _passes(name, images) / rate
        return math.ceil(CLUSTER["safety_factor"] * (5 + seconds / 60)) * attempt

    return runtime


def memory(name, processes=1):
    """A rule's memory (MB per node) as a resource function: the rule's base plus its copies
    of the prepared images, per process on the node, times cluster.safety_factor, times the
    attempt."""

    def mem_mb(wildcards, input, attempt):
        if name in CLUSTER["mem_mb"]:
            return CLUSTER["mem_mb"][name] * attempt
        images, size = _prepared(input)
        cost = COST[name]
        mb = processes * (cost["base_mb"] + cost["copies"] * images * size / 1e6)
        return math.ceil(CLUSTER["safety_factor"] * mb) * attempt

    return mem_mb


def fixed(name, key, value):
    """A rule's constant request (cluster.runtime / cluster.mem_mb may replace it), times the
    attempt."""

    def request(wildcards, attempt):
        return CLUSTER[key].get(name, value) * attempt

    return request


# Several training processes per run (train.processes on each of train.nodes hosts): under
# SLURM one task per process, a GPU each, started by srun inside the job (the ranks read
# SLURM_PROCID and SLURM_LOCALID, pipeline.train.distributed); locally one process spawns them.
PROCESSES = config["train"].get("processes", 1)
NODES = config["train"].get("nodes", 1)
TASKS = PROCESSES * NODES
TRAIN_GPUS = GPU * TASKS
# Threads are per SLURM task on a cluster; locally the job's processes share one host.
TRAIN_THREADS = heavy_threads(GPU) * (PROCESSES if not ON_CLUSTER else 1)


def train_tasks():
    """The SLURM task layout of a multi-process run: `mpi` makes the executor run the job's
    command as is (its srun starts the tasks), `tasks_per_gpu` keeps --ntasks-per-gpu at 1."""
    if TASKS == 1:
        return {}
    return {"tasks": TASKS, "nodes": NODES, "mpi": "srun", **({"tasks_per_gpu": 1} if GPU else {})}


def train_launch(wildcards, input, threads):
    """`srun` starting a multi-process run's tasks inside its SLURM job; nothing elsewhere
    (a plain process spawns its own, pipeline.train.distributed.launch)."""
    if TASKS == 1 or workflow.is_main_process or "SLURM_JOB_ID" not in os.environ:
        return ""
    return f"srun --nodes={NODES} --ntasks={TASKS} --cpus-per-task={threads} --kill-on-bad-exit=1"

LATENTS = config["latent"]["models"]
METRICS = config["neighbours"]["metrics"]
SPACES = LATENTS + (["pixels"] if config["neighbours"]["pixels"] else [])
SEEDS = config["train"]["seeds"]
# train.seeds_in_one_job: a run's seeds train in one job, one after another, so a small
# experiment pays a process's imports once per run; else one job per seed, in parallel.
SEEDS_IN_ONE_JOB = config["train"]["seeds_in_one_job"]
TRAIN_JOB = "{run}" if SEEDS_IN_ONE_JOB else "{run}-seed{seed}"  # a train job's log name
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


def train_files(name):
    """A train job's file ``name`` (encoder.pt, history.csv, ...) per seed it trains: every
    seed's with train.seeds_in_one_job, else the {seed} wildcard's."""
    seeds = SEEDS if SEEDS_IN_ONE_JOB else ["{seed}"]
    return [os.path.join(train_dir("{run}", s), name) for s in seeds]


def job_seeds(wildcards):
    """The seeds a train job trains: its {seed}, or all of them (train.seeds_in_one_job)."""
    return SEEDS if SEEDS_IN_ONE_JOB else [int(wildcards.seed)]


# The two below take `input` so that Snakemake counts them as derived params, out of its
# params rerun trigger: switching train.seeds_in_one_job cuts the same trainings differently,
# and re-runs none of them.
def train_seeds(wildcards, input):
    return " ".join(map(str, job_seeds(wildcards)))


def train_state(wildcards, input):
    """The resumable checkpoint per seed: a param, never an output, so Snakemake keeps it."""
    return [os.path.join(train_dir(wildcards.run, s), "state.pt") for s in job_seeds(wildcards)]


def train_neighbours(wildcards):
    """The neighbours file of an offline source: mined once in a latent space, or in the
    features of the run's previous refresh round (one per seed); none for a baseline or the
    queue."""
    run = run_of(wildcards)
    if run.source == "latent":
        return [f"{R}/neighbours/{run.space}-{run.metric}/neighbours.parquet"]
    if run.source == "refresh":
        return [f"{R}/neighbours/refresh/{run.name}/seed{s}/neighbours.parquet"
                for s in job_seeds(wildcards)]
    return []


def train_args(wildcards, input):
    """The run's method, use and source as command-line flags."""
    run = run_of(wildcards)
    args = f"--method {run.method} --use {run.use}"
    if run.source:
        args += f" --source {run.source} --round {run.round}"
        args += f" --space {run.space} --metric {run.metric}" if run.space else ""
    if input.neighbours:  # one for a latent space, one per seed for a refresh round
        args += " --neighbours " + " ".join(input.neighbours)
    return args


def refresh_features(wildcards):
    """The features a refresh round mines: the previous round's encoder's."""
    run = RUNS[wildcards.run].previous()
    return os.path.join(train_dir(run.name, wildcards.seed), "features.parquet")


def neighbours_metric(wildcards):
    """The metric of a neighbours job: its wildcard, or a refresh round's run's metric."""
    if "metric" in wildcards.keys():
        return wildcards.metric
    return RUNS[wildcards.run].metric


def train_encoders(wildcards):
    """A run's encoder per seed: evaluate_train probes them in one job."""
    return [os.path.join(train_dir(wildcards.run, s), "encoder.pt") for s in SEEDS]
