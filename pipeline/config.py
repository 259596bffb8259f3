"""Config validation against the JSON schema, and the flat per-stage params each rule receives."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline import PipelineError
from pipeline.io import shown_path

WORKFLOW = Path(__file__).resolve().parent.parent / "workflow"
SCHEMA = WORKFLOW / "schemas" / "config.schema.yaml"
PRESETS = WORKFLOW / "presets"

LATENT_MODELS = ("autodecoder", "ae", "vae")
METRICS = ("euclidean", "cosine")


def load_schema(path: str | Path = SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _twice(loader: yaml.SafeLoader, node: yaml.Node, path: tuple = (),
           seen: set | None = None) -> tuple[str, int, int] | None:
    """The first mapping key given twice under ``node``: (dotted key, first line, second line).

    Keys compare as YAML reads them (``seed`` and ``'seed'`` are one key; ``1`` and ``'1'``
    are two). Merge keys (``<<``) may repeat: PyYAML merges each in turn.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already walked (or a recursive one)
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in lines:
                    return _key((*path, key)), lines[key], line
                lines[key] = line
            found = _twice(loader, value_node, (*path, key), seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _twice(loader, item, (*path, i), seen)
            if found:
                return found
    return None


def _yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line error (problem, context, a snippet) as one line with its place."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    text = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: "
    text += (error.problem or "").removeprefix("but ")
    if error.context:
        where = error.context_mark
        text += f" ({error.context}" + (f" at line {where.line + 1})" if where else ")")
    return text


_KINDS = {list: "a list", str: "a string", bool: "true/false", int: "a number",
          float: "a number"}


def read_config_file(path: str | Path) -> dict:
    """A config file's keys, refusing what PyYAML would accept silently or say in a traceback.

    A key given twice at any depth (PyYAML keeps the last), a top level that is not a mapping
    and a syntax error each raise a one-line :class:`PipelineError` naming the file, e.g.
    ``config file 'exp.yaml': key 'seed' appears twice (lines 1 and 3); keep one``. An empty
    file is ``{}``. As Snakemake does, a file is read as JSON first, then as YAML.
    """
    path = Path(path)
    name = shown_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"config file {name!r}: cannot read it ({error})") from None
    try:
        data = json.loads(text)
        # JSON allows tabs between tokens, YAML does not; a raw tab cannot be inside a JSON
        # string, so spaces in their place leave every key and line where it was.
        text = text.replace("\t", " ")
    except ValueError:
        data = None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        found = _twice(loader, node) if node is not None else None
        if data is None and node is not None:
            data = loader.construct_document(node)
    except yaml.YAMLError as error:
        if data is None:
            raise PipelineError(f"config file {name!r}: {_yaml_error(error)}") from None
        found = None  # JSON that YAML 1.1 cannot read: JSON's value stands, unchecked
    finally:
        loader.dispose()
    if found:
        key, first, second = found
        raise PipelineError(f"config file {name!r}: key {key!r} appears twice "
                            f"(lines {first} and {second}); keep one")
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = _KINDS.get(type(data), type(data).__name__)
        raise PipelineError(f"config file {name!r}: the top level is {kind}, not a mapping "
                            "of keys to values (e.g. 'seed: 0')")
    return data


@functools.lru_cache(maxsize=1)
def _shared_schema() -> dict:
    """The project's schema parsed once, for read-only lookups of single fields."""
    return load_schema()


def _enum(*path: str) -> tuple[str, ...]:
    sub = load_schema()
    for part in path:
        sub = sub["properties"][part]
    return tuple(sub["items"]["enum"])


# The schema's enums are the lists the workflow knows; tests check that they name exactly
# the registries in pipeline.train (imported here they would pull in torch).
METHODS = _enum("train", "methods")
USES = _enum("train", "uses")


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
        raise PipelineError(
            f"config: the training keys moved from byol: to train: (shared by every method; "
            f"byol: keeps only tau_base): {where}{', ...' if len(old) > 4 else ''}; "
            "and byol.sources' online is now queue")


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
PATTERN_WORDS = {
    "dataset.tag": "is not a folder name; use letters, digits, '-', '_' or '.', not starting "
                   "with '.' (e.g. 'mnist-small')",
}


def _message(where: str, error: Any) -> str:
    """One line for a schema error at dotted key ``where``, from any entry point."""
    if error.validator == "pattern" and where in PATTERN_WORDS:
        return f"config key {where!r}: {error.instance!r} {PATTERN_WORDS[where]}"
    return f"config key {where or '<root>'!r}: {error.message}"


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
RUNTIME_KEYS = {"latent": ("on_collapse",), "neighbours": ("chunk_size",),
                "train": ("checkpoint_every",), "evaluate": ()}
GRID_KEYS = {"neighbours": ("metrics", "pixels"),
             "train": ("methods", "uses", "seeds", "sources", "refresh_rounds"),
             "evaluate": ("untrained",)}


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
