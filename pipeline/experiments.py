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


# ------------------------------------------------------------------ the report's configuration

# dataset keys that only some sources read (pipeline.prepare); another source's keys never
# show in the report: an image-folder experiment has no dataset.synthetic.*.
SOURCE_KEYS = {
    "root": ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder",
             "npz"),
    "download": ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10"),
    "resize": ("imagefolder",),
    "test_fraction": ("digits", "synthetic", "imagefolder"),
    "stl10_unlabeled": ("stl10",),
    "synthetic": ("synthetic",),
}


def used_config(config: dict, tag: str) -> dict:
    """The resolved config as the experiment used it: ``dataset.tag`` is the folder name
    actually used (also when it came from the config file's name), and the ``dataset`` keys
    that only another source reads (:data:`SOURCE_KEYS`) are left out."""
    out = json.loads(json.dumps(config, default=str))
    dataset = out["dataset"]
    for key, sources in SOURCE_KEYS.items():
        if dataset.get("name") not in sources:
            dataset.pop(key, None)
    dataset["tag"] = tag
    return out


def changed_keys(config: dict, tag: str) -> dict[str, tuple]:
    """Dotted key -> (value, schema default) for every key of :func:`used_config` whose value
    is not the schema default (``dataset.tag`` left out: the report names the tag itself);
    the default is ``None`` for a key the schema gives none."""
    from pipeline.config import validate_config
    from pipeline.schema import flatten

    defaults = flatten(validate_config({}))
    used = flatten(used_config(config, tag))
    return {k: (v, defaults.get(k)) for k, v in used.items()
            if k != "dataset.tag" and (k not in defaults or v != defaults[k])}


def _preset_keys(config: dict) -> tuple[str, set[str]]:
    """The preset the config resolved (``""`` for none) and the dotted keys it sets."""
    from pipeline.config import load_preset, presets
    from pipeline.schema import flatten

    name = config.get("preset", "auto")
    if name == "auto":
        name = config["dataset"]["name"] if config["dataset"]["name"] in presets() else "none"
    if name == "none":
        return "", set()
    return name, set(flatten(load_preset(name)))


def _yaml_lines(node: dict, changed: dict[str, tuple], order: dict, prefix: str = "",
                pad: str = "") -> list[str]:
    """A nested config as YAML (values in JSON flow style), keys in the schema's order (that
    of ``order``, a dict of the defaults), each changed key commented with its default."""
    lines = []
    rank = {k: i for i, k in enumerate(order)}
    for key in sorted(node, key=lambda k: (rank.get(k, len(rank)), k)):
        value, dotted = node[key], f"{prefix}{key}"
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(value, changed, order.get(key) or {}, dotted + ".",
                                 pad + "  ")
        else:
            note = (f"  # default: {json.dumps(changed[dotted][1])}" if dotted in changed
                    else "")
            lines.append(f"{pad}{key}: {json.dumps(value)}{note}")
    return lines


def config_rst(config: dict, tag: str) -> str:
    """The report landing page's configuration section (reStructuredText): the experiment's
    tag as used, the keys that differ from the schema defaults (those a preset filled
    marked), and the whole resolved config in a collapsed block."""
    import html

    changed = changed_keys(config, tag)
    preset, from_preset = _preset_keys(config)
    dataset = config["dataset"]
    why = ("set by dataset.tag" if dataset.get("tag") else
           "the data set's name" if tag == dataset["name"] else "the config file's name")
    lines = [f"**Experiment** ``{tag}`` ({why}): results in ``results/{tag}/``.", ""]
    if changed:
        lines += [f"**Configuration**: the {len(changed)} key"
                  f"{'s' if len(changed) != 1 else ''} that differ from the schema defaults "
                  "(``workflow/schemas/config.schema.yaml``); every other key has its "
                  "default" + (f"; *preset*: filled by the {preset} preset" if preset else "")
                  + ".", "", "::", ""]
        for key, (value, _) in changed.items():
            mark = f"  (preset {preset})" if key in from_preset else ""
            lines.append(f"   {key}: {json.dumps(value)}{mark}")
    else:
        lines.append("**Configuration**: every key has its schema default "
                     "(``workflow/schemas/config.schema.yaml``).")
    from pipeline.config import validate_config

    full = "\n".join(_yaml_lines(used_config(config, tag), changed, validate_config({})))
    lines += ["", ".. raw:: html", "",
              "   <details><summary>The whole resolved configuration (every key; a changed "
              "key shows its default)</summary><pre>"]
    lines += [f"   {line}" for line in html.escape(full, quote=False).splitlines()]
    lines += ["   </pre></details>", ""]
    return "\n".join(lines)


def write_config_rst(path: str | Path, config: dict, tag: str) -> None:
    """Write :func:`config_rst` to ``path`` (the report includes it on its landing page)."""
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(config_rst(config, tag), encoding="utf-8")
