"""Shared fixtures: tiny configs and a runner for the Snakemake DAG in a temporary copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

# A grid small enough for seconds per stage: synthetic gratings, few epochs.
TINY = {
    "seed": 0,
    "device": "cpu",
    "dataset": {"name": "synthetic", "synthetic": {"classes": 3, "per_class": 24, "size": 12}},
    "latent": {"dim": 4, "epochs": 2, "width": 8, "batch_size": 32,
               "autodecoder": {"infer_steps": 5}},
    "neighbours": {"k": 3},
    "train": {"epochs": 2, "batch_size": 32, "proj_dim": 16, "proj_hidden": 32,
             "checkpoint_every": 1, "warmup_epochs": 1, "seeds": [0]},
    "evaluate": {"max_iter": 200, "knn_k": [5, 200]},
}


def tiny_config(**overrides) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


class Workflow:
    """A copy of the workflow (Snakefile, workflow/, pipeline/) in a temporary directory."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        for name in ("Snakefile", "workflow", "pipeline", "profiles"):
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, path / name)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [SNAKEMAKE, "--cores", "2", *args]
        proc = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True, timeout=1200)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def planned(self, *args: str) -> dict[str, int]:
        """Rule -> job count that a dry run would execute now."""
        out = self.run("--dry-run", *args)
        text = out.stdout + out.stderr
        if "Nothing to be done" in text:
            return {}
        table = text.split("Job stats:")[-1]
        jobs = {}
        for line in table.splitlines():
            m = re.match(r"^([A-Za-z_]\w*)\s+(\d+)\s*$", line.strip())
            if m and m.group(1) not in ("total", "all"):
                jobs[m.group(1)] = int(m.group(2))
        return jobs


class CountingImages:
    """A prepared set's images that record how many rows each read returns."""

    def __init__(self, images):
        self.images, self.reads = images, []
        self.shape, self.dtype, self.ndim = images.shape, images.dtype, images.ndim

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        out = self.images[key]
        self.reads.append(len(out) if out.ndim == self.ndim else 1)
        return out


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """In-process CLI calls (`--threads N`) set process-wide thread counts; undo them."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    monkeypatch.delenv("OMP_NUM_THREADS")  # restored (or removed) after the test
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Run a test's torch work on one thread (restored afterwards by _restore_threads)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def encoder(tmp_path, one_thread):
    """(encoder.pt, prepared folder): an untrained smallconv on 24 synthetic 12 px RGB images."""
    from pipeline.prepare import PrepareParams, SyntheticParams, prepare
    from pipeline.train.encoder import write_untrained

    data = tmp_path / "prepared"
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=8, size=12, channels=3)), data)
    out = tmp_path / "encoder.pt"
    write_untrained("smallconv", 0, data, out)
    return out, data


@pytest.fixture
def workflow(tmp_path) -> Workflow:
    return Workflow(tmp_path, tiny_config())
