"""The `nnbyol` console command: help for every option, a dry run of the tiny DAG, the report's
path, embedding an image folder, argument order, exit statuses and one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Workflow, tiny_config
from PIL import Image

from pipeline import cli
from pipeline.__main__ import parser as stage_parser
from pipeline.embed import embed_images, read_embeddings
from pipeline.io import load_prepared

ENTRY = Path(sys.executable).parent / "nnbyol"
NNBYOL = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "pipeline.cli"]


def nnbyol(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NNBYOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _options(p: argparse.ArgumentParser):
    """Every (command, action) of a parser and its subcommands, help actions apart."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, s in action.choices.items():
                yield from ((f"{name} {c}".strip(), a) for c, a in _options(s))
        elif not isinstance(action, argparse._HelpAction):
            yield "", action


@pytest.mark.parametrize("make", [cli.parser, stage_parser], ids=["nnbyol", "python -m pipeline"])
def test_every_option_has_help(make):
    missing = [f"{cmd}: {a.option_strings or a.dest}" for cmd, a in _options(make()) if not a.help]
    assert missing == []


@pytest.mark.parametrize("command", ["", "run", "report", "embed"])
def test_help_of_each_command_lists_its_options(command):
    proc = nnbyol(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: nnbyol {command}".rstrip())
    expected = {"": ["run", "report", "embed"],
                "run": ["CONFIG", "--cores", "--profile", "--dry-run", "--directory", "-- "],
                "report": ["CONFIG", "--cores", "--profile", "--dry-run", "--directory"],
                "embed": ["--encoder", "--images", "--out", "--device", "--batch-size",
                          "--chunk"]}[command]
    for word in expected:
        assert word in proc.stdout


@pytest.fixture
def tiny(tmp_path) -> Workflow:
    (tmp_path / "project").mkdir()
    return Workflow(tmp_path / "project", tiny_config())


def test_arguments_in_any_order_make_one_snakemake_call(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_snakemake", lambda args, root: calls.append(args) or 0)
    monkeypatch.chdir(tiny.path)
    (tiny.path / "exp.yaml").write_text("seed: 1\n")
    orders = [["run", "exp.yaml", "--cores", "2", "--profile", "slurm", "--dry-run"],
              ["run", "--dry-run", "--cores", "2", "exp.yaml", "--profile", "slurm"],
              ["run", "--profile", "slurm", "--dry-run", "exp.yaml", "--cores", "2"]]
    for order in orders:
        assert cli.main([*order, "--", "--keep-going"]) == 0
    # The target before --configfile, which takes several values and would swallow it.
    assert calls == [["--cores", "2", "results/linear_eval.csv", "--workflow-profile",
                      "workflow/profiles/slurm", "--dry-run", "--keep-going",
                      "--configfile", "exp.yaml"]] * 3


def _jobs(text: str) -> str:
    return text.split("Job stats:")[-1]


def test_run_dry_run_plans_the_dag_from_any_order_and_passes_extra_args(tiny, tmp_path):
    (tiny.path / "exp.yaml").write_text((tiny.path / "config.yaml").read_text())
    proc = nnbyol("run", "--dry-run", "exp.yaml", "--cores", "1", cwd=tiny.path)
    assert proc.returncode == 0, proc.stderr
    assert ("+ snakemake --cores 1 results/linear_eval.csv --dry-run --configfile exp.yaml"
            in proc.stderr)
    jobs = _jobs(proc.stdout + proc.stderr)
    assert "train" in jobs and "evaluate" in jobs and "prepare" in jobs
    assert not (tiny.path / "results").exists()

    # From another folder with --directory, Snakemake's own options after "--".
    proc = nnbyol("run", "--directory", str(tiny.path), "--", "--forceall", "--dry-run",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--forceall --dry-run --configfile config.yaml" in proc.stderr
    assert "train" in proc.stdout + proc.stderr


def test_snakemakes_exit_status_passes_through_and_own_errors_are_one_line(tiny, tmp_path):
    proc = nnbyol("run", "--", "--no-such-option", cwd=tiny.path)
    assert proc.returncode == 2  # Snakemake's usage error
    assert "--no-such-option" in proc.stderr

    for args, cwd, message in [
        (["run"], tmp_path, f"nnbyol: error: {tmp_path} is not the project root (no "
                            "Snakefile): run nnbyol from the folder with the Snakefile, or "
                            "pass --directory"),
        (["report", "missing.yaml"], tiny.path, "nnbyol: error: config file not found: "
                                               "missing.yaml"),
        (["run", "--profile", "cloud"], tiny.path, "nnbyol: error: no profile 'cloud' in "
                                                   "workflow/profiles; use one of: default, "
                                                   "slurm"),
    ]:
        proc = nnbyol(*args, cwd=cwd)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message + "\n")


def test_report_dry_run_names_the_report_in_the_experiments_folder(tiny):
    exp = tiny.path / "experiments" / "mine"
    exp.mkdir(parents=True)
    (exp / "config.yaml").write_text((tiny.path / "config.yaml").read_text())
    proc = nnbyol("report", "experiments/mine/config.yaml", "--dry-run", cwd=tiny.path)
    assert proc.returncode == 0, proc.stderr
    assert "train" in _jobs(proc.stdout + proc.stderr)
    html = tiny.path.resolve() / "results" / "mine" / "report.html"
    assert proc.stdout.splitlines()[-1] == f"report (not written, dry run): {html}"


def test_embed_writes_the_features_of_an_image_folder(tmp_path, encoder):
    encoder, data = encoder
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, im in enumerate(load_prepared(data).images[:4]):
        Image.fromarray(im).save(folder / f"{i}.png")
    out = tmp_path / "features.parquet"
    # Options in any order, as python -m pipeline embed-images takes them.
    assert cli.main(["embed", "--out", str(out), "--device", "cpu", "--images", str(folder),
                     "--encoder", str(encoder), "--batch-size", "3"]) == 0
    (paths, feats), _ = read_embeddings(out)
    expected = embed_images(encoder, folder, "cpu")
    assert paths == expected.paths == [f"{i}.png" for i in range(4)]
    np.testing.assert_allclose(feats, expected.features, rtol=1e-5, atol=1e-5)

    proc = nnbyol("embed", "--encoder", str(tmp_path / "none.pt"), "--images", str(folder),
                  "--out", str(out))
    assert (proc.returncode, proc.stderr) == (
        1, f"nnbyol: error: encoder checkpoint not found: {tmp_path / 'none.pt'}\n")
