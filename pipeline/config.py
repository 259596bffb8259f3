"""Config validation against the JSON schema, and the flat per-stage params each rule receives."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline import PipelineError

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

LATENT_MODELS = ("autodecoder", "ae", "vae")
METRICS = ("euclidean", "cosine")
VARIANTS = ("baseline", "probabilistic", "weighted")


def load_schema(path: str | Path = SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _apply_defaults(instance: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _apply_defaults(instance[key], sub)


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return a copy of ``config`` with defaults filled in, or raise one-line PipelineError.

    The message names the offending key with its dotted path, e.g.
    ``config key 'latent.dim': -1 is less than the minimum of 1``.
    """
    import jsonschema

    schema = load_schema() if schema is None else schema
    config = copy.deepcopy(dict(config))
    _apply_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return config
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(repr(f"{where}.{k}" if where else k) for k in extra)
        raise PipelineError(f"config: unknown key {keys}; allowed here: {', '.join(allowed)}")
    raise PipelineError(f"config key {where or '<root>'!r}: {error.message}")


def flatten(section: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat ``{"a.b": scalar}`` with sorted keys (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key in sorted(section):
        value = section[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def as_param(flat: dict[str, Any]) -> str:
    """Serialise stage params for a rule: one JSON string, keys sorted, so repr is stable."""
    return json.dumps(flat, sort_keys=True, separators=(",", ":"))


def prepare_params(config: dict) -> dict[str, Any]:
    return flatten({**config["dataset"], "seed": config["seed"]})


def latent_params(config: dict, model: str) -> dict[str, Any]:
    """Shared latent keys overridden by the model's own section; other models' keys excluded."""
    section = config["latent"]
    shared = {k: v for k, v in section.items() if k not in LATENT_MODELS and k != "models"}
    return flatten({**shared, **section.get(model, {}), "seed": config["seed"]})


def neighbours_params(config: dict) -> dict[str, Any]:
    section = config["neighbours"]
    return flatten({k: v for k, v in section.items() if k not in ("metrics", "pixels")})


def byol_params(config: dict, variant: str) -> dict[str, Any]:
    """Shared BYOL keys plus the variant's own section (seed comes from the wildcard)."""
    section = config["byol"]
    shared = {k: v for k, v in section.items() if k not in VARIANTS + ("variants", "seeds")}
    return flatten({**shared, **section.get(variant, {})})


def evaluate_params(config: dict) -> dict[str, Any]:
    return flatten(config["evaluate"])


def dataset_tag(config: dict) -> str:
    return config["dataset"].get("tag") or config["dataset"]["name"]


def run_name(stage: str, variant: str = "", latent: str = "", metric: str = "") -> str:
    """Readable run names: pixels, latent-vae, byol-baseline, byol-weighted-ae-cosine."""
    parts = {"pixels": ["pixels"], "latent": ["latent", latent]}.get(
        stage, ["byol", variant, latent, metric]
    )
    return "-".join(p for p in parts if p)


def parse_run_name(name: str) -> dict[str, str]:
    """Inverse of :func:`run_name`: the table's stage/latent/metric/variant columns."""
    parts = name.split("-")
    if parts == ["pixels"]:
        return {"stage": "pixels", "latent": "", "metric": "", "variant": ""}
    if parts[0] == "latent" and len(parts) == 2:
        return {"stage": "latent", "latent": parts[1], "metric": "", "variant": ""}
    if parts[0] == "byol" and len(parts) in (2, 4):
        latent, metric = (parts[2], parts[3]) if len(parts) == 4 else ("", "")
        return {"stage": "byol", "latent": latent, "metric": metric, "variant": parts[1]}
    raise PipelineError(f"not a run name: {name!r}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(t for t in options if t is not type(None))
        origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"param {key!r}: expected a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and not (isinstance(value, kind) and
                                         not (kind is int and isinstance(value, bool))):
        raise PipelineError(f"param {key!r}: expected {kind.__name__}, got {value!r}")
    return value


def build(cls: type, flat: dict[str, Any]):
    """Build dataclass ``cls`` from flat params; nested dataclass fields take ``name.`` keys.

    Unknown keys are an error, so a typo in a rule never silently falls back to a default.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    used: set[str] = set()
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            prefix = field.name + "."
            sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            used.update(prefix + k for k in sub)
            kwargs[field.name] = build(kind, sub)
        elif field.name in flat:
            used.add(field.name)
            kwargs[field.name] = _coerce(flat[field.name], kind, field.name)
    unknown = sorted(set(flat) - used)
    if unknown:
        raise PipelineError(f"{cls.__name__}: unknown params {unknown}")
    return cls(**kwargs)
