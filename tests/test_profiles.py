"""Execution profiles and rule resources: what local and SLURM runs ask the scheduler for."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, SNAKEMAKE, Workflow, tiny_config

PROFILES = ROOT / "workflow" / "profiles"
RULES = ROOT / "workflow" / "rules"
# Stages that run on a GPU when there is one; every other rule is CPU-only.
GPU_RULES = {"train_latent", "export_latents", "neighbours", "train", "evaluate_train", "embed",
             "neighbours_refresh"}
# Rules that the tiny grid never runs: embed (an opt-in target), and the refresh source's
# mining (train.refresh_rounds); the queue source is a run of `train` like any other.
OPT_IN = {"embed", "neighbours_refresh"}


def load_profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def rule_blocks() -> dict[str, str]:
    """Rule name -> its source text, from every workflow/rules/*.smk file; a rule derived with
    `use rule A as B with:` gets A's text followed by its own changes."""
    blocks, derived = {}, {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        parts = re.split(r"^rule (\w+):\n", text, flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            blocks[name] = body.split("\n\n\n")[0]
        for parent, name in re.findall(r"^use rule (\w+) as (\w+) with:$", text, flags=re.M):
            derived[name] = parent
    for name, parent in derived.items():
        blocks[name] = blocks[parent]
    return blocks


def dry_run_resources(workflow: Workflow, device: str) -> dict[str, dict[str, str]]:
    """Rule -> resources of its jobs, as a forced dry run of the tiny DAG prints them."""
    out = workflow.run("--dry-run", "--forceall", "--config", f"device={device}").stdout
    resources: dict[str, dict[str, str]] = {}
    for block in re.split(r"^rule ", out, flags=re.M)[1:]:
        name = block.split(":", 1)[0]
        if name == "all":
            continue
        line = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if line:
            resources[name] = dict(kv.split("=", 1) for kv in line.group(1).split(", "))
    return resources


def test_default_profile_is_local_with_one_job_per_gpu():
    prof = load_profile("default")
    assert "executor" not in prof
    assert prof["cores"] == "all"
    assert prof["resources"] == {"gpu": 1}
    assert prof["show-failed-logs"] is True and prof["rerun-incomplete"] is True


def test_slurm_profile_settings():
    prof = load_profile("slurm")
    assert prof["executor"] == "slurm"
    assert prof["jobs"] >= 10
    # Clusters without accounting: the executor must poll squeue, not sacct.
    assert prof["slurm-status-command"] == "squeue"
    assert prof["latency-wait"] >= 30 and prof["retries"] >= 1
    assert {"mem_mb", "runtime"} <= set(prof["default-resources"])
    # A global gpu limit would serialise every GPU job of the cluster.
    assert "resources" not in prof
    assert {"persistence", "input-output", "sources"} <= set(prof["shared-fs-usage"])


@pytest.mark.parametrize("name", ["default", "slurm"])
def test_profile_keys_are_snakemake_options(name):
    from snakemake.cli import get_argument_parser

    options = get_argument_parser()._option_string_actions
    unknown = [k for k in load_profile(name) if f"--{k}" not in options]
    assert unknown == []


@pytest.mark.parametrize("name", ["default", "slurm"])
def test_snakemake_accepts_profile(tmp_path, name):
    wf = Workflow(tmp_path, tiny_config())
    proc = subprocess.run(
        [SNAKEMAKE, "--workflow-profile", str(PROFILES / name), "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert f"workflow specific profile {PROFILES / name}" in text
    assert "aggregate" in wf.planned()


def test_every_rule_declares_threads_and_resources():
    blocks = rule_blocks()
    listed = subprocess.run([SNAKEMAKE, "--list-rules"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True).stdout
    # Continuation lines of a multi-line docstring are indented; rule names are not.
    assert set(blocks) == {line.split()[0] for line in listed.splitlines()
                           if line.strip() and not line[0].isspace() and line.split()[0] != "all"}
    for name, body in blocks.items():
        assert re.search(r"^    threads: \S+", body, flags=re.M), f"{name}: no threads"
        resources = body.split("    resources:\n", 1)
        assert len(resources) == 2, f"{name}: no resources"
        declared = set(re.findall(r"^        (\w+)=", resources[1], flags=re.M))
        assert {"mem_mb", "runtime"} <= declared, f"{name}: {declared}"
        assert ("gpu" in declared) == (name in GPU_RULES), f"{name}: gpu"


def test_gpu_stages_request_a_gpu_only_when_the_device_is_cuda(workflow):
    cuda = dry_run_resources(workflow, "cuda")
    assert {r for r, res in cuda.items() if res.get("gpu") == "1"} == GPU_RULES - OPT_IN
    assert all(int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0 for res in cuda.values())
    cpu = dry_run_resources(workflow, "cpu")
    assert set(cpu) == set(cuda)
    assert all(res.get("gpu", "0") == "0" for res in cpu.values())


class _Resources(dict):
    __getattr__ = dict.__getitem__


class _Job:
    """The part of a snakemake job that the slurm plugin's sbatch builder reads."""

    def __init__(self, threads: int, **resources):
        self.threads = threads
        self.resources = _Resources(resources)


def _sbatch(job: _Job) -> str:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
              "partition": " -p debug", "workdir": "/w"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_slurm_plugin_maps_rule_resources_to_sbatch():
    """What the README promises: threads, mem_mb, runtime and gpu become sbatch flags."""
    gpu = _sbatch(_Job(4, mem_mb=16000, runtime=720, gpu=1))
    assert "--cpus-per-task=4" in gpu and "--mem 16000" in gpu and "-t 720" in gpu
    assert gpu.endswith(" --gpus=1") and " -p debug" in gpu
    typed = _sbatch(_Job(4, mem_mb=16000, runtime=720, gpu=1, gpu_model="a100"))
    assert typed.endswith(" --gpus=a100:1")
    cpu = _sbatch(_Job(1, mem_mb=2000, runtime=10, gpu=0))
    assert "--gpus" not in cpu and "--cpus-per-task=1" in cpu and "--ntasks=1" in cpu
    gres = _sbatch(_Job(2, mem_mb=8000, runtime=60, gres="gpu:h100:1"))
    assert gres.endswith(" --gres=gpu:h100:1")


@pytest.mark.parametrize("threads", [1, 2])
def test_cli_threads_flag_sets_torch_and_faiss_threads(threads):
    probe = (
        "import os, sys, torch, faiss\n"
        "import pipeline.__main__ as cli\n"
        "def seen(a):\n"
        "    print(torch.get_num_threads(), faiss.omp_get_max_threads(),"
        " os.environ['OMP_NUM_THREADS'])\n"
        "cli._aggregate = seen\n"
        f"sys.exit(cli.main(['--threads', '{threads}', 'aggregate', '--out', 'x', 'y']))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    assert out == [str(threads)] * 3
