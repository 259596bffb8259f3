"""The configuration reference (docs/configuration.md), generated from the schema: every key's
type, default, range and description have one home, the schema, and the page cannot drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.schema import SCHEMA, load_schema

HEADER = """# Configuration reference

Generated from `workflow/schemas/config.schema.yaml` by
`python -m pipeline config-docs --out docs/configuration.md` (a test checks that this page
is current). Every key is optional: a key a config leaves unset takes the default below
(for digits, first the preset `workflow/presets/digits.yaml`). Nested keys are written with
dots; in a YAML file they are nested mappings (`train.queue.k: 5` is `train: {queue: {k: 5}}`).
"""


def _type(sub: dict) -> str:
    if "enum" in sub:
        return " | ".join(f"`{v}`" for v in sub["enum"])
    kind = sub.get("type", "")
    kinds = [kind] if isinstance(kind, str) else list(kind)
    if "array" in kinds and "items" in sub:
        return f"list of {_type(sub['items'])}"
    return " or ".join(k for k in kinds if k) or "any"


def _range(sub: dict) -> str:
    parts = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                      ("exclusiveMaximum", "<")):
        if key in sub:
            parts.append(f"{sign} {sub[key]}")
    if sub.get("minItems"):
        parts.append(f"at least {sub['minItems']} item(s)")
    return ", ".join(parts)


def _default(sub: dict) -> str:
    if "default" not in sub:
        return "(unset)"
    value = sub["default"]
    if isinstance(value, dict) and not value:
        return ""
    return f"`{json.dumps(value)}`"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(props: dict, prefix: str) -> list[str]:
    rows = []
    for name, sub in props.items():
        key = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub:
            rows += _rows(sub["properties"], f"{key}.")
            continue
        kind = _type(sub) + (f" ({_range(sub)})" if _range(sub) else "")
        rows.append(f"| `{key}` | {_cell(kind)} | {_default(sub)} | "
                    f"{_cell(sub.get('description', ''))} |")
    return rows


def config_markdown(schema: dict | None = None) -> str:
    """The reference page: one table per top-level section, keys in schema order."""
    schema = load_schema() if schema is None else schema
    top = schema["properties"]
    lines = [HEADER, "## Top-level keys", "", "| key | type | default | meaning |",
             "| --- | --- | --- | --- |"]
    lines += _rows({k: v for k, v in top.items() if v.get("type") != "object"}, "")
    for name, sub in top.items():
        if sub.get("type") != "object":
            continue
        lines += ["", f"## `{name}`", "", _cell(sub.get("description", "")), "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += _rows(sub.get("properties", {}), f"{name}.")
    return "\n".join(lines) + "\n"


def write_config_docs(out: str | Path, schema_path: str | Path = SCHEMA) -> None:
    Path(out).write_text(config_markdown(load_schema(schema_path)))
