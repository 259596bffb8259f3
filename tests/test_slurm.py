"""The tiny DAG on a real single-node SLURM gives the same table as a local run.

The session fixture starts SLURM with workflow/scripts/slurm-up.sh (root only; it installs
slurm-wlm and munge with apt-get when missing) and skips with the script's reason when that
fails; set NNBYOL_REQUIRE_SLURM=1 (as CI does) to fail instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
from conftest import ROOT, SNAKEMAKE, Workflow, tiny_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = ROOT / "workflow" / "scripts" / "slurm-up.sh"
PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
# A grid that still has one job of every rule: one latent model, one metric, the baseline
# and one neighbour use, raw-pixel neighbours, the untrained control.
GRID = {"latent": {"models": ["vae"]}, "neighbours": {"metrics": ["cosine"]},
        "train": {"uses": ["baseline", "probabilistic"], "seeds": [0]}}
# Columns that identify a row, and the numbers that must agree; timings, device and host
# may differ between a local run and a SLURM job.
KEYS = ["dataset", "run", "stage", "method", "variant", "source", "latent", "metric", "round",
        "seed"]
# Rules that run where snakemake runs (the Snakefile's localrules), never through sbatch.
LOCAL = {"check_data", "purity", "untrained", "evaluate_latent", "aggregate", "figures",
         "combine"}
NUMBERS = ["top1", "knn5_top1", "knn200_top1", "purity_at_1", "purity_at_k", "feature_dim",
           "epochs", "n_train", "n_test"]


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM with partition `debug`; stopped again if we started it."""
    required = os.environ.get("NNBYOL_REQUIRE_SLURM") == "1"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"single-node SLURM required but unavailable: {reason}")
        pytest.skip(f"single-node SLURM unavailable: {reason}")

    if os.geteuid() != 0:
        unavailable("needs root to install and start slurmctld/slurmd")
    already_up = shutil.which("sinfo") is not None and _script("status", timeout=30).returncode == 0
    started = time.perf_counter()
    try:
        proc = _script("start", timeout=900)
    except subprocess.TimeoutExpired:
        unavailable(f"{SCRIPT.name} did not finish within 900 s")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        unavailable(lines[-1] if lines else f"{SCRIPT.name} exited {proc.returncode}")
    print(f"\n{proc.stdout.strip()} ({time.perf_counter() - started:.1f} s)")
    yield
    if not already_up:
        _script("stop", timeout=60)


def test_script_makes_one_idle_node_with_default_debug_partition(slurm_cluster):
    sinfo = subprocess.run(["sinfo", "--noheader", "--format=%P %a %l %D %T %c"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert sinfo.split()[:5] in (["debug*", "up", "infinite", "1", state]
                                 for state in ("idle", "mixed", "allocated"))
    assert int(sinfo.split()[5]) == os.cpu_count()
    # A second call finds everything up and changes nothing.
    again = _script("start", timeout=60)
    assert again.returncode == 0 and "stopped" not in again.stdout
    assert re.search(r"^slurm-up: node \S+ is (idle|mixed|allocated)", again.stdout, flags=re.M)


def test_tiny_dag_on_slurm_matches_local_run(tmp_path, slurm_cluster):
    config = tiny_config(**GRID)
    for name in ("local", "slurm"):
        (tmp_path / name).mkdir()
    local = Workflow(tmp_path / "local", config)
    t0 = time.perf_counter()
    local.run()
    local_s = time.perf_counter() - t0

    # The project's slurm profile as it is; the site's keys in the config: this cluster's
    # partition for CPU jobs, and a GPU partition it lacks (no job may ask for it: on
    # device cpu no job requests a GPU).
    site = {"cpu_partition": "debug", "gpu_partition": "no-such-gpu-partition"}
    remote = Workflow(tmp_path / "slurm", {**config, "cluster": site})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [SNAKEMAKE, "--workflow-profile", str(PROFILE.parent),
             # Poll squeue every few seconds: the tiny jobs take seconds, not hours.
             "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
             "--latency-wait", "10", "--retries", "0"],
            cwd=remote.path, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        # Jobs that can never start (e.g. asking for more CPUs than the node has) pend forever.
        queue = subprocess.run(["squeue", "--format=%i %j %T %r %C %m"], capture_output=True,
                               text=True).stdout
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        pytest.fail(f"the SLURM run did not finish in 900 s; queue:\n{queue}")
    slurm_s = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    print(f"local run {local_s:.1f} s, SLURM run {slurm_s:.1f} s")

    # Every job but the local ones (the target `all`, the data checks and the bookkeeping)
    # went through sbatch and left a SLURM log.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", text)
    planned = re.search(r"^total\s+(\d+)$", text, flags=re.M)
    local_jobs = re.findall(r"^localrule (\w+):$", text, flags=re.M)
    assert set(local_jobs) == {"all", *LOCAL}
    assert planned and len(submitted) == int(planned.group(1)) - len(local_jobs)
    logs = list((remote.path / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} == set(submitted)
    assert any("rule_train" in p.parts for p in logs)
    # What SLURM granted each job (finished jobs stay visible for MinJobAge = 600 s): the
    # CPU partition, no GPU, and never a bookkeeping rule.
    for jobid in submitted:
        job = subprocess.run(["scontrol", "--oneliner", "show", "job", jobid],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rule = re.search(r"Comment=rule_([a-z_]+?)(?:_wildcards_\S*)?\s", job).group(1)
        assert rule not in LOCAL and "Partition=debug " in job, job
        tres = re.findall(r"\b(?:TRES|Tres\w*|Gres\w*)=(\S*)", job)
        assert tres and "gpu" not in " ".join(tres).lower(), job
    # The site's keys never re-run anything: without them the finished DAG stays finished.
    remote.write_config(config)
    assert "Nothing to be done" in remote.run("--dry-run").stdout

    ours = pd.read_csv(remote.path / "results" / "linear_eval.csv")
    theirs = pd.read_csv(local.path / "results" / "linear_eval.csv")
    assert len(ours) == len(theirs) == 5
    assert set(ours["run"]) == {"pixels", "latent-vae", "untrained", "byol-baseline",
                                "byol-probabilistic-vae-cosine"}
    ours = ours.sort_values(KEYS).reset_index(drop=True)
    theirs = theirs.sort_values(KEYS).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours[KEYS], theirs[KEYS])
    numbers = [c for c in NUMBERS if c in ours]
    pd.testing.assert_frame_equal(ours[numbers], theirs[numbers], check_exact=False,
                                  rtol=0, atol=1e-6)
