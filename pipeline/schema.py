"""The schema, field by field: typed stage dataclasses built from flat params, every value
checked by the same rule and message as config.yaml (one home for every key's type, default,
range and description: ``workflow/schemas/config.schema.yaml``)."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline import PipelineError

WORKFLOW = Path(__file__).resolve().parent.parent / "workflow"
SCHEMA = WORKFLOW / "schemas" / "config.schema.yaml"


# libyaml's loader parses the schema five times faster than the pure-Python one (0.02 s
# against 0.09 s), which every stage's process pays; the results are equal.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema(path: str | Path = SCHEMA) -> dict:
    return yaml.load(Path(path).read_text(), Loader=_LOADER)


@functools.lru_cache(maxsize=1)
def _shared_schema() -> dict:
    """The project's schema parsed once, for read-only lookups of single fields."""
    return load_schema()


def _enum(*path: str) -> tuple[str, ...]:
    sub = _shared_schema()
    for part in path:
        sub = sub["properties"][part]
    return tuple(sub["items"]["enum"])


# The schema's enums are the lists the workflow knows; tests check that they name exactly
# the registries in pipeline.train (imported here they would pull in torch).
METHODS = _enum("train", "methods")
USES = _enum("train", "uses")


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _check_finite(value: Any, path: tuple = ()) -> None:
    """JSON schema has no way to say 'finite': NaN passes every bound, inf most of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, (*path, i))
    elif isinstance(value, float) and not math.isfinite(value):
        raise PipelineError(f"config key {_key(path)!r}: {value} is not a finite number")


PATTERN_WORDS = {
    "dataset.tag": "is not a folder name; use letters, digits, '-', '_' or '.', not starting "
                   "with '.' (e.g. 'mnist-small')",
}


def _message(where: str, error: Any) -> str:
    """One line for a schema error at dotted key ``where``, from any entry point."""
    if error.validator == "pattern" and where in PATTERN_WORDS:
        return f"config key {where!r}: {error.instance!r} {PATTERN_WORDS[where]}"
    return f"config key {where or '<root>'!r}: {error.message}"


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


# Where each stage dataclass's fields live in the schema, so that a value reaching a stage
# through the CLI or Python is checked by the same rule, with the same message, as config.yaml.
STAGE_SECTIONS = {
    "PrepareParams": "dataset", "SyntheticParams": "dataset.synthetic",
    "LatentParams": "latent", "NeighboursParams": "neighbours", "TrainParams": "train",
    "EvaluateParams": "evaluate",  # AugmentParams: train.view1 / train.view2, as TrainParams'
    # fields; a method's section (TrainParams.byol) is the top-level byol section
}


def field_schema(section: str, name: str, schema: dict | None = None) -> tuple[str, dict]:
    """The dotted key and schema of a stage field: the section's own key, a key of one of
    its sub-sections (a model's or a variant's), or a top-level key (``seed``)."""
    root = _shared_schema() if schema is None else schema
    sub = root
    for part in section.split("."):
        sub = sub["properties"][part]
    props = sub["properties"]
    if name in props:
        return f"{section}.{name}", props[name]
    for key, child in props.items():
        if name in child.get("properties", {}):
            return f"{section}.{key}.{name}", child["properties"][name]
    if name in root["properties"]:
        return name, root["properties"][name]
    raise KeyError(f"{section}.{name}")


def _check_field(cls: type, name: str, value: Any, section: str | None = None) -> None:
    import jsonschema

    section = section or STAGE_SECTIONS.get(cls.__name__)
    if section is None:
        return
    key, sub = field_schema(section, name)
    _check_finite(value, tuple(key.split(".")))
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(sub).iter_errors(value))
    if error is not None:
        raise PipelineError(_message(".".join([key, *(str(p) for p in error.absolute_path)]),
                                     error))


def _nested(section: str | None, name: str) -> str | None:
    """A nested dataclass field's schema section: its parent's section plus the field name,
    or a method's own top-level section (``byol``, ``simclr``, ``nnclr``)."""
    if section == "train" and name in METHODS:
        return name
    return f"{section}.{name}" if section else None


def check_fields(params: Any, section: str | None = None) -> None:
    """Check a stage dataclass built in Python (not through :func:`build`) by the schema."""
    section = section or STAGE_SECTIONS.get(type(params).__name__)
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, _nested(section, field.name))
        else:
            _check_field(type(params), field.name, value, section)


def build(cls: type, flat: dict[str, Any], section: str | None = None):
    """Build dataclass ``cls`` from flat params; nested dataclass fields take ``name.`` keys.

    Unknown keys are an error, so a typo in a rule never silently falls back to a default.
    A nested field is checked against its parent's schema section plus its name
    (``TrainParams.view1`` -> ``train.view1``; ``TrainParams.byol`` -> ``byol``).
    """
    section = section or STAGE_SECTIONS.get(cls.__name__)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    used: set[str] = set()
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            prefix = field.name + "."
            sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            used.update(prefix + k for k in sub)
            if field.default_factory is not dataclasses.MISSING:
                # Keys left out keep the field's default instance's values (a BYOL view's
                # blur and solarisation have no class default, only a per-view one).
                sub = {**dataclasses.asdict(field.default_factory()), **sub}
            kwargs[field.name] = build(kind, sub, _nested(section, field.name))
        elif field.name in flat:
            used.add(field.name)
            _check_field(cls, field.name, flat[field.name], section)
            kwargs[field.name] = _coerce(flat[field.name], kind, field.name)
    unknown = sorted(set(flat) - used)
    if unknown:
        raise PipelineError(f"{cls.__name__}: unknown params {unknown}")
    return cls(**kwargs)


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
