"""Config files read strictly: a key given twice, a top level that is not a mapping, or a
syntax error is one line naming the file, never what PyYAML would silently keep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline import PipelineError
from pipeline.io import shown_path
from pipeline.schema import _key


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


