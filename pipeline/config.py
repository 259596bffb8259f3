"""Config validation against the JSON schema, and the flat per-stage params each rule receives."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from pipeline import PipelineError
from pipeline.configfile import read_config_file
from pipeline.schema import (  # noqa: F401 - build, check_fields, field_schema: the public face
    METHODS,
    SCHEMA,
    USES,
    WORKFLOW,
    _check_finite,
    _message,
    build,
    check_fields,
    field_schema,
    flatten,
    load_schema,
)
from pipeline.train.grid import GRID_KEYS as TRAIN_GRID_KEYS
from pipeline.train.grid import RUNTIME_KEYS as TRAIN_RUNTIME_KEYS

PRESETS = WORKFLOW / "presets"
LATENT_MODELS = ("autodecoder", "ae", "vae")
METRICS = ("euclidean", "cosine")


def _apply_defaults(instance: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _apply_defaults(instance[key], sub)


def _types(sub: dict) -> set[str]:
    kind = sub.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


_NULLS = ("null", "Null", "NULL", "~")


def coerce_strings(value: Any, sub: dict) -> Any:
    """Type ``--config`` values by the schema.

    Snakemake parses a nested ``--config 'train={"epochs": 2}'`` with YAML's base loader, so
    every leaf arrives as a string; a leaf whose schema admits no string is parsed as YAML
    (``"2"`` -> 2, ``"true"`` -> True, ``"null"`` -> None). Values already typed are kept.
    """
    if isinstance(value, dict):
        props = sub.get("properties", {})
        return {k: coerce_strings(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_strings(v, sub.get("items", {})) for v in value]
    if not isinstance(value, str):
        return value
    kinds = _types(sub)
    if "null" in kinds and value in _NULLS:
        return None
    if not kinds or "string" in kinds or "enum" in sub and all(
            isinstance(e, str) for e in sub["enum"]):
        return value
    # YAML reads "1e-3" as a string; Python's own number syntax is what a user types.
    for parse in (int, float) if kinds & {"integer", "number"} else ():
        try:
            return parse(value)
        except ValueError:
            pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _check_schedules(config: dict) -> None:
    """Warm-ups must end before training does: each key's own bound accepts a warm-up longer
    than the run, which then silently trains with another schedule than the one set.

    ``lr_at`` ramps to ``train.lr`` over ``warmup_epochs``: longer than ``train.epochs``, the
    peak is never reached; equal, it is reached on the last step and never decays. The
    neighbours' share ramps as ``step / ramp``, so at ``neighbour_warmup_epochs`` equal to
    ``train.epochs`` the last step still uses (N - 1) / N of it: strictly less, both. A
    warm-up of 0 (none) is valid with any ``train.epochs``. The latent stage has no schedule.
    """
    t = config["train"]
    epochs, warmup = t["epochs"], t["warmup_epochs"]
    if warmup >= epochs:
        why = ("would never reach train.lr" if warmup > epochs
               else "would reach train.lr only on the last step and never decay")
        raise PipelineError(f"config key 'train.warmup_epochs': {warmup} must be less than "
                            f"train.epochs ({epochs}); the learning rate {why}; lower it "
                            "(0 = no warm-up) or raise train.epochs")
    ramp = t["neighbour_warmup_epochs"]
    # Baseline runs never read the ramp (BYOL_NEIGHBOUR_KEYS): only a neighbour grid needs it.
    if ramp >= epochs and any(v != "baseline" for v in t["uses"]):
        raise PipelineError(f"config key 'train.neighbour_warmup_epochs': {ramp} must be less "
                            f"than train.epochs ({epochs}); the neighbours' share would never "
                            "reach its set value; lower it (0 = full from the start) or raise "
                            "train.epochs")


# What moved when training became one section for every method (train:) beside each
# method's own (byol:, simclr:, nnclr:): an old config gets one line saying where.
_MOVED = {"variants": "train.uses", "online": "train.queue", "tau_base": "byol.tau_base"}


def _check_layout(config: dict) -> None:
    old = sorted(set(config.get("byol") or {}) - {"tau_base"}) if isinstance(
        config.get("byol"), dict) else []
    if old:
        where = ", ".join(f"byol.{k} -> {_MOVED.get(k, 'train.' + k)}" for k in old[:4])
        online = "online" in (config["byol"].get("sources") or [])
        raise PipelineError(
            f"config: the training keys moved from byol: to train: (shared by every method; "
            f"byol: keeps only tau_base): {where}{', ...' if len(old) > 4 else ''}"
            + ("; and byol.sources' online is now queue" if online else ""))


def _check_grid(config: dict) -> None:
    from pipeline.train.grid import check_grid

    check_grid(config)


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return a copy of ``config`` with defaults filled in, or raise one-line PipelineError.

    The message names the offending key with its dotted path, e.g.
    ``config key 'latent.dim': -1 is less than the minimum of 1``.
    """
    import jsonschema

    schema = load_schema() if schema is None else schema
    config = copy.deepcopy(dict(config))
    _check_layout(config)
    _check_finite(config)
    _apply_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        _check_schedules(config)
        _check_grid(config)
        return config
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(repr(f"{where}.{k}" if where else k) for k in extra)
        raise PipelineError(f"config: unknown key {keys}; allowed here: {', '.join(allowed)}")
    raise PipelineError(_message(where, error))


# What a key's schema ``pattern`` means, in words: jsonschema would print the regex.
def as_param(flat: dict[str, Any]) -> str:
    """Serialise stage params for a rule: one JSON string, keys sorted, so repr is stable.

    Braces inside values (a ``dataset.root`` may hold them) become JSON escapes: Snakemake
    expands ``{name}`` in a params string as a wildcard. ``flat`` has no nested objects, so
    the outer pair is the only structural one.
    """
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    inner = text[1:-1].replace("{", "\\u007b").replace("}", "\\u007d")
    return "{" + inner + "}"


def prepare_params(config: dict) -> dict[str, Any]:
    return flatten({**config["dataset"], "seed": config["seed"]})


def latent_params(config: dict, model: str) -> dict[str, Any]:
    """Shared latent keys overridden by the model's own section; other models' keys excluded."""
    section = config["latent"]
    shared = {k: v for k, v in section.items()
              if k not in LATENT_MODELS and k != "models" and k not in RUNTIME_KEYS["latent"]}
    return flatten({**shared, **section.get(model, {}), "seed": config["seed"]})


# Keys that only choose which jobs exist or how a job runs, never what it computes: they
# stay out of the stage params, so changing them never invalidates finished results.
RUNTIME_KEYS = {"latent": ("on_collapse", "device_memory_share"),
                "neighbours": ("chunk_size",), "train": TRAIN_RUNTIME_KEYS, "evaluate": ()}
GRID_KEYS = {"neighbours": ("metrics", "pixels"),
             "train": TRAIN_GRID_KEYS,
             "evaluate": ("untrained",)}


# Site settings (the cluster: section) choose what a job asks the scheduler for, never what it
# computes: no stage's params hold them, and neither does the experiment's fingerprint.
SITE_KEYS = ("cluster",)


def without_site_keys(config: dict) -> dict:
    """The config without its site settings (``SITE_KEYS``): what fingerprints an experiment."""
    return {k: v for k, v in config.items() if k not in SITE_KEYS}


def runtime_params(config: dict, stage: str) -> dict[str, Any]:
    """A stage's runtime-only settings (see ``RUNTIME_KEYS``), passed to the CLI apart."""
    return {k: config[stage][k] for k in RUNTIME_KEYS[stage] if k in config[stage]}


def _result_keys(config: dict, stage: str) -> dict[str, Any]:
    skip = RUNTIME_KEYS[stage] + GRID_KEYS[stage]
    return {k: v for k, v in config[stage].items() if k not in skip}


def neighbours_params(config: dict) -> dict[str, Any]:
    return flatten(_result_keys(config, "neighbours"))


def evaluate_params(config: dict) -> dict[str, Any]:
    return flatten(_result_keys(config, "evaluate"))


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"config key 'preset': no preset {name!r}; known: "
                            f"{', '.join(['auto', 'none', *presets()])}")
    return read_config_file(path)


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, nested dicts merged key by key (lists replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(user: dict, schema: dict | None = None) -> dict:
    """The experiment's full config: the user's keys, then the data set's preset, then the
    schema defaults; typed by the schema and validated.

    A preset (``workflow/presets/<dataset.name>.yaml``) holds values tuned for one data set
    (digits' mild crops and small batches); it fills only keys the user left unset, and
    never reaches another data set. ``preset: none`` turns it off.
    """
    schema = load_schema() if schema is None else schema
    user = coerce_strings(copy.deepcopy(dict(user)), schema)
    name = (user.get("dataset") or {}).get("name") or schema["properties"]["dataset"][
        "properties"]["name"]["default"]
    preset = user.get("preset", schema["properties"]["preset"]["default"])
    if preset == "auto":
        preset = name if name in presets() else "none"
    if preset != "none" and isinstance(preset, str):
        user = _merge(load_preset(preset), user)
    return validate_config(user, schema)


