"""Execution profiles and rule resources: what local and SLURM runs ask the scheduler for."""

from __future__ import annotations

import os
import re
import shutil
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
# Seconds of bookkeeping that run where snakemake runs, never in a cluster's queue.
LOCAL = {"check_data", "purity", "untrained", "evaluate_latent", "aggregate", "figures",
         "combine"}


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


def job_resources(text: str) -> dict[str, dict[str, str]]:
    """Rule -> resources (and threads) of its jobs, as a dry run prints them."""
    resources: dict[str, dict[str, str]] = {}
    for block in re.split(r"^(?:local)?rule ", text, flags=re.M)[1:]:
        name = block.split(":", 1)[0]
        if name == "all":
            continue
        line = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        threads = re.search(r"^\s+threads: (\d+)$", block, flags=re.M)
        if line:
            resources[name] = dict(kv.split("=", 1) for kv in line.group(1).split(", "))
            resources[name]["threads"] = threads.group(1) if threads else "1"
    return resources


def cluster_dry_run(path, *args: str) -> dict[str, dict[str, str]]:
    """Rule -> resources of every job, as a forced dry run under the SLURM profile plans
    them (no cluster needed); --cores lifts the dry run's one-core cap on threads."""
    proc = subprocess.run(
        [SNAKEMAKE, "--workflow-profile", str(PROFILES / "slurm"), "--dry-run", "--forceall",
         "--cores", "64", *args], cwd=path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return job_resources(proc.stdout)


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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workflow:
    """The tiny workflow with its data prepared and checked (the sizes the resources read)."""
    wf = Workflow(tmp_path_factory.mktemp("prepared"), tiny_config())
    wf.run("results/synthetic/data_checked.json")
    return wf


# The site's keys as a cluster's config sets them once.
SITE = {"gpu_partition": "gpu", "cpu_partition": "cpu", "account": "proj",
        "gpu_account": "proj-gpu", "cpus_per_gpu": 3}


def test_gpu_stages_request_a_gpu_only_when_the_device_is_cuda(prepared):
    prepared.write_config(tiny_config(device="cuda", cluster=SITE))
    cuda = cluster_dry_run(prepared.path)
    assert {r for r, res in cuda.items() if res.get("gpu") == "1"} == GPU_RULES - OPT_IN
    assert all(int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0 for res in cuda.values())
    for rule, res in cuda.items():
        gpu = rule in GPU_RULES
        # The GPU partition, account and threads only for a job that asks for a GPU.
        assert res.get("slurm_partition") == ("gpu" if gpu else "cpu") or rule in LOCAL, rule
        assert res.get("slurm_account") == ("proj-gpu" if gpu else "proj") or rule in LOCAL
        assert (res["threads"] == "3") == gpu, rule
    prepared.write_config(tiny_config(device="cpu", cluster=SITE))
    cpu = cluster_dry_run(prepared.path)
    assert set(cpu) == set(cuda)
    assert all(res.get("gpu", "0") == "0" for res in cpu.values())
    assert {res.get("slurm_partition") for r, res in cpu.items() if r not in LOCAL} == {"cpu"}
    assert all("gpu_model" not in res for res in cpu.values())


def test_runtime_and_memory_grow_with_the_data_and_the_epochs(prepared, tmp_path):
    def train(path, **overrides):
        (path / "config.yaml").write_text(yaml.safe_dump(tiny_config(**overrides)))
        return cluster_dry_run(path, "results/synthetic/train/byol-baseline/seed0/encoder.pt")[
            "train"]

    # The tiny set (72 images of 12x12x3) costs only the floor: 2 x 5 minutes to start.
    small = train(prepared.path, device="cuda")
    assert small["runtime"] == "11" and small["gpu"] == "1"
    # 6,000 epochs of 10 images' worth of 32x32x3 at 500 images/s per GPU: 2 more minutes.
    longer = train(prepared.path, device="cuda", train={"epochs": 6000, "warmup_epochs": 1})
    assert int(longer["runtime"]) > int(small["runtime"])
    on_cpu = train(prepared.path, device="cpu", train={"epochs": 6000, "warmup_epochs": 1})
    assert int(on_cpu["runtime"]) > int(longer["runtime"])  # 20 images/s per CPU thread
    assert on_cpu["mem_mb"] == longer["mem_mb"] == small["mem_mb"]
    # A run's 3 seeds in one job (train.seeds_in_one_job): three trainings' minutes, one
    # start.
    grouped = train(prepared.path, device="cuda", train={
        "epochs": 6000, "warmup_epochs": 1, "seeds": [0, 1, 2], "seeds_in_one_job": True})
    assert (int(longer["runtime"]), int(grouped["runtime"])) == (12, 15)
    fixed = train(prepared.path, device="cuda", cluster={"runtime": {"train": 90},
                                                          "mem_mb": {"train": 12000}})
    assert (fixed["runtime"], fixed["mem_mb"]) == ("90", "12000")

    # 9,000 images instead of 72: more time and more memory.
    big = {"name": "synthetic", "synthetic": {"classes": 3, "per_class": 3000, "size": 12}}
    Workflow(tmp_path, tiny_config(dataset=big)).run("results/synthetic/prepared")
    large = train(tmp_path, device="cuda", dataset=big,
                  train={"epochs": 6000, "warmup_epochs": 1})
    assert int(large["runtime"]) > int(longer["runtime"])
    assert int(large["mem_mb"]) > int(longer["mem_mb"])


STUBS = {
    # Record the call and refuse the job: nothing runs, the error shows the call too.
    "sbatch": 'printf "%s\\n" "sbatch $*" >> "$STUB_SBATCH_LOG"; echo "stub: refused" >&2; exit 1',
    "sacctmgr": "echo proj; echo proj-gpu",
    "sshare": "echo proj",
    "sinfo": 'echo "debug* up infinite 1 idle"',
    "squeue": "exit 0",
    "sacct": "exit 0",
    "scontrol": 'echo "MaxArraySize = 1001"; echo "MinJobAge = 600 sec"',
}


def stub_submit(path, tmp_path, *args: str) -> tuple[dict[str, list[str]], str]:
    """Run the SLURM profile against stub SLURM commands: job (rule and wildcards, as the
    plugin's --comment names it) -> its sbatch calls (a retry after the first), and
    snakemake's output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_SBATCH_LOG": str(log)}
    proc = subprocess.run(
        [SNAKEMAKE, "--workflow-profile", str(PROFILES / "slurm"), "--keep-going",
         "--slurm-init-seconds-before-status-checks", "1", *args],
        cwd=path, capture_output=True, text=True, timeout=300, env=env)
    calls: dict[str, list[str]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        job = re.search(r"--comment rule_(\S+) ", line).group(1)
        calls.setdefault(job, []).append(line.split(" --wrap=")[0])
    return calls, proc.stdout + proc.stderr


def test_sbatch_asks_for_gpus_and_the_gpu_partition_only_for_gpu_stages(prepared, tmp_path):
    prepared.write_config(tiny_config(device="cuda", cluster=SITE))
    calls, text = stub_submit(prepared.path, tmp_path)
    # The first jobs after the data check: three GPU stages and the pixel probe; the
    # untrained control ran here (local), never through sbatch.
    rules = {job.split("_wildcards_")[0] for job in calls}
    assert rules == {"train_latent", "neighbours", "train", "evaluate_pixels",
                     "evaluate_train"}, text[-3000:]
    assert "localrule untrained:" in text
    for job, (first, retry) in calls.items():
        gpu = not job.startswith("evaluate_pixels")
        assert (" -p gpu " in first, " -p cpu " in first) == (gpu, not gpu), first
        assert (" -A proj-gpu " if gpu else " -A proj ") in first, first
        assert first.rstrip().endswith(" --gpus=1") == gpu and ("--gpus" in first) == gpu
        # GPU jobs take their CPUs from cluster.cpus_per_gpu, not from this host's cores.
        assert ("--cpus-per-task=3" in first) == gpu, first
        # The retry (the profile's retries: 1) asks for twice the time and memory.
        t, mem = (int(re.search(rf"{flag} (\d+)", first).group(1)) for flag in ("-t", "--mem"))
        assert f" -t {2 * t} " in retry and f" --mem {2 * mem} " in retry, retry


def test_a_multi_process_run_asks_for_a_task_and_a_gpu_per_process(prepared, tmp_path):
    target = "results/synthetic/train/byol-baseline/seed0/encoder.pt"
    prepared.write_config(tiny_config(device="cuda", cluster=SITE,
                                      train={"processes": 2, "nodes": 2}))
    calls, text = stub_submit(prepared.path, tmp_path, "--retries", "0", target)
    (call,) = calls["train_wildcards_byol-baseline_0"]
    for flag in ("--nodes=2", "--ntasks=4", "--ntasks-per-gpu=1", "--cpus-per-task=3",
                 "--gpus=4", " -p gpu "):
        assert flag in call, call
    # Inside the job (a node's snakemake, not the main process) srun starts the 4 tasks.
    proc = subprocess.run([SNAKEMAKE, "--mode", "remote", "--dry-run", "--printshellcmds",
                           "--cores", "64", "--forcerun", "train", target],
                          cwd=prepared.path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLURM_JOB_ID": "7"})
    assert ("srun --nodes=2 --ntasks=4 --cpus-per-task=3 --kill-on-bad-exit=1 python -m "
            "pipeline --threads 3 train ") in proc.stdout, proc.stdout + proc.stderr


def test_bookkeeping_rules_run_where_snakemake_runs():
    listed = re.search(r"^localrules: (.*)$", (ROOT / "Snakefile").read_text(), flags=re.M)
    blocks = rule_blocks()
    local = {r.strip() for r in listed.group(1).split(",")}
    local |= {name for name, body in blocks.items() if "    localrule: True" in body}
    assert local == LOCAL
    assert not local & GPU_RULES


@pytest.mark.parametrize(("args", "config", "message"), [
    (["--resources", "gpu=3"], {}, "error: --resources gpu=3: this host has 0 GPU(s) "
                                    "(nvidia-smi -L); run at most 1 GPU job(s) at once "
                                    "(--resources gpu=1)"),
    ([], {"device": "cuda"}, "error: config key 'device': cuda, but this host has no GPU "
                             "(nvidia-smi -L lists none); use device auto or cpu here, or "
                             "submit to a cluster (--workflow-profile profiles/slurm)"),
    (["--workflow-profile", str(PROFILES / "slurm")], {"device": "auto"},
     "error: config key 'device': auto decides from the submitting host whether jobs get "
     "GPUs; on a cluster set device: cuda (the GPU stages ask for GPUs) or cpu"),
    ([], {"cluster": {"runtime": {"trian": 60}}}, "error: config key 'cluster.runtime': "
                                                  "'trian' is not a rule here; the rules are "),
])
def test_bad_gpu_and_cluster_requests_fail_in_one_line_before_any_job(
        tmp_path, args, config, message):
    if "0 GPU(s)" in message or "no GPU" in message:
        if shutil.which("nvidia-smi"):
            pytest.skip("written for a host without GPUs")
    wf = Workflow(tmp_path, tiny_config(**config))
    proc = wf.run("--dry-run", *args, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_site_file_holds_the_cluster_keys_of_every_experiment(tmp_path):
    """The documented command: `--configfile site.yaml experiment.yaml`, no target after it
    and no --default-resources; the experiment (last) names the folder."""
    wf = Workflow(tmp_path, tiny_config())
    experiment = tiny_config()
    del experiment["device"]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({"device": "cuda", "cluster": SITE}))
    proc = subprocess.run(
        [SNAKEMAKE, "--workflow-profile", str(PROFILES / "slurm"), "--dry-run",
         "--configfile", "site.yaml", "exp.yaml"],
        cwd=wf.path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = job_resources(proc.stdout)
    assert planned["train"]["slurm_partition"] == "gpu" and planned["train"]["gpu"] == "1"
    assert planned["prepare"]["slurm_partition"] == "cpu"
    assert "results/exp/prepared" in proc.stdout


def test_site_keys_change_no_params_tag_or_fingerprint():
    from pipeline.config import resolve_config, without_site_keys
    from pipeline.experiments import config_hash, experiment_tag

    plain = resolve_config(tiny_config())
    site = resolve_config(tiny_config(cluster=SITE))
    assert experiment_tag(plain) == experiment_tag(site)
    assert config_hash(without_site_keys(plain)) == config_hash(without_site_keys(site))
    assert without_site_keys(site) == without_site_keys(plain) and "cluster" in site


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


@pytest.mark.parametrize(("threads", "granted", "used"),
                         [(1, None, 1), (2, None, 2), (2, "1", 1), (None, "2", 2)])
def test_cli_threads_flag_sets_torch_and_faiss_threads(threads, granted, used):
    """--threads N sets every library's threads; inside a SLURM job never above its grant."""
    flag = f"'--threads', '{threads}', " if threads else ""
    probe = (
        "import os, sys, torch, faiss\n"
        "import pipeline.__main__ as cli\n"
        "def seen(a):\n"
        "    print(torch.get_num_threads(), faiss.omp_get_max_threads(),"
        " os.environ['OMP_NUM_THREADS'])\n"
        "cli._aggregate = seen\n"
        f"sys.exit(cli.main([{flag}'aggregate', '--out', 'x', 'y']))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           **({"SLURM_CPUS_PER_TASK": granted} if granted else {})}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    assert out == [str(used)] * 3
