"""Experiment folders: which config made ``results/<tag>/``, so two experiments never share one."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import read_json, shown_path, write_json

# Written into every experiment folder when a run starts (never by a dry run or a report).
OWNER = "experiment.json"
WORKFLOW_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def experiment_tag(config: dict, configfiles: Sequence[str | Path] = ()) -> str:
    """The experiment's folder name under ``results/``.

    ``dataset.tag`` when set; else the last ``--configfile``'s stem, or its folder's name when
    the file is called ``config.yaml`` (the ``experiments/<name>/config.yaml`` layout); else
    (the workflow's own ``config.yaml``) the data set's name.
    """
    if config["dataset"].get("tag"):
        return config["dataset"]["tag"]
    if configfiles:
        path = Path(configfiles[-1]).resolve()
        name = path.stem
        if name == "config":
            name = "" if path == WORKFLOW_CONFIG else path.parent.name
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
        if name:
            return name
    return config["dataset"]["name"]


def config_hash(config: dict) -> str:
    """sha256 of the resolved config (defaults filled in), independent of key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_owner(folder: str | Path, config_file: str | Path, config: dict) -> None:
    """Refuse a config that would write into another config's experiment folder.

    The same file (edited or not) or an identical resolved config may re-use the folder;
    a folder from before owners were recorded is taken over by its next run.
    """
    marker = Path(folder) / OWNER
    if not marker.is_file():
        return
    try:
        owner = read_json(marker)
        made_by = Path(owner["config_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable marker is rewritten by the next run
    if made_by == Path(config_file).resolve() or owner.get("config_hash") == config_hash(config):
        return
    raise PipelineError(
        f"{shown_path(folder)} holds the experiment of {shown_path(made_by)}; "
        f"{shown_path(config_file)} is a different config and would overwrite it: give it a "
        f"folder of its own with dataset.tag (in the file, or --config "
        f"'dataset={{\"tag\": \"NAME\"}}'), or delete {shown_path(folder)} to start over")


def record_owner(folder: str | Path, config_file: str | Path, config: dict) -> None:
    """Write the folder's owner: the config file's absolute path and the config's hash."""
    write_json(Path(folder) / OWNER, {"config_file": str(Path(config_file).resolve()),
                                      "config_hash": config_hash(config)})


def report_path(argv: Sequence[str]) -> Path | None:
    """The path given to Snakemake's ``--report`` on a command line, or None."""
    for i, arg in enumerate(argv):
        if arg == "--report":
            following = argv[i + 1] if i + 1 < len(argv) else ""
            return Path(following if following and not following.startswith("-")
                        else "report.html")
        if arg.startswith("--report="):
            return Path(arg.split("=", 1)[1])
    return None


def check_report(report: str | Path, folder: str | Path, config_file: str | Path,
                 table: str | Path) -> None:
    """A report shows the experiment of the config it was given, from results already built.

    Args:
        report: the ``--report`` path; it must lie in ``folder``.
        folder: this config's experiment folder (``results/<tag>``).
        config_file: the config this run was given (named in the messages).
        table: the experiment's results table; it must exist.
    """
    report, folder = Path(report).resolve(), Path(folder).resolve()
    if folder not in report.parents:
        owner = report.parent / OWNER
        hint = "the experiment's config"
        if owner.is_file():
            try:
                hint = shown_path(read_json(owner)["config_file"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        raise PipelineError(
            f"--report {shown_path(report)} is not in {shown_path(folder)}, the folder of "
            f"{shown_path(config_file)}: add --configfile {hint} to report that experiment")
    if not Path(table).is_file():
        raise PipelineError(
            f"{shown_path(folder)} has no results yet ({shown_path(table)} is missing): run "
            f"snakemake --cores 8 results/linear_eval.csv --configfile {shown_path(config_file)} "
            "first, then the report")
