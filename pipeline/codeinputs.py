"""A stage's code inputs: the `pipeline` source files its command imports, found statically."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

PACKAGE = "pipeline"
_ROOT = Path(__file__).absolute().parent.parent

# One import statement: (level, module, names); level 0 is absolute, `import a.b` has no names.
_Import = tuple[int, str, tuple[str, ...]]


def module_files(*modules: str, root: Path | None = None) -> list[str]:
    """Source files of ``modules`` and of every ``pipeline`` module they import, transitively.

    Imports are read with :mod:`ast`, never run, so this is cheap at Snakemake's parse time.
    Imports inside functions count (stages import heavy modules lazily), and so do a module's
    parent packages, since importing it runs their ``__init__.py``. Imports of other packages
    are left out.

    Args:
        modules: dotted names such as ``"pipeline.evaluate"``; a package means its
            ``__init__.py``.
        root: the folder that holds the ``pipeline`` package; defaults to this checkout's.

    Returns:
        Absolute paths, sorted and unique.

    Raises:
        ValueError: a module, given or imported, that is not found under ``root``.
    """
    root = _ROOT if root is None else Path(root).absolute()
    found: dict[str, Path] = {}
    todo = [(name, None) for name in modules]
    while todo:
        name, importer = todo.pop()
        if name in found:
            continue
        path = _locate(name, root)
        if path is None:
            by = f" (imported by {importer})" if importer else ""
            raise ValueError(f"unknown module {name!r}: not a module of the {PACKAGE} package "
                             f"under {root}{by}")
        found[name] = path
        parent = name.rpartition(".")[0]
        if parent:
            todo.append((parent, path))
        package = name if path.name == "__init__.py" else parent
        for entry in _parse(str(path), path.stat().st_mtime_ns):
            todo += [(m, path) for m in _resolve(entry, package, root, path)]
    return sorted({str(p) for p in found.values()})


def stage_module(command: str, root: Path | None = None) -> tuple[str, ...]:
    """The modules that the handler of ``python -m pipeline <command>`` imports.

    Read statically from ``pipeline/__main__.py``: ``parser()`` registers
    ``stage("<command>", _handler, ...)``, and ``_handler`` imports its stage's module.

    Args:
        command: a stage name of the CLI, such as ``"evaluate"`` or ``"byol-untrained"``.
        root: the folder that holds the ``pipeline`` package; defaults to this checkout's.

    Returns:
        Dotted module names in import order, such as ``("pipeline.evaluate",)``.

    Raises:
        ValueError: ``command`` is not a registered stage.
    """
    stages = stage_modules(root)
    if command not in stages:
        raise ValueError(f"unknown stage {command!r} of python -m {PACKAGE}; "
                         f"known: {', '.join(stages)}")
    return stages[command]


def stage_modules(root: Path | None = None) -> dict[str, tuple[str, ...]]:
    """Every stage registered in ``pipeline/__main__.py``, mapped to its handler's imports."""
    root = _ROOT if root is None else Path(root).absolute()
    main = root / PACKAGE / "__main__.py"
    stages = {}
    for command, entries in _stages(str(main), main.stat().st_mtime_ns):
        modules = [m for entry in entries for m in _resolve(entry, PACKAGE, root, main)]
        stages[command] = tuple(dict.fromkeys(modules))
    return stages


def _locate(name: str, root: Path) -> Path | None:
    """The file of module ``name`` under ``root``: a package's ``__init__.py`` first, as Python."""
    parts = name.split(".")
    if parts[0] != PACKAGE or not all(part.isidentifier() for part in parts):
        return None
    base = root.joinpath(*parts)
    for path in (base / "__init__.py", base.with_name(f"{parts[-1]}.py")):
        if path.is_file():
            return path
    return None


def _resolve(entry: _Import, package: str, root: Path, path: Path) -> list[str]:
    """The ``pipeline`` modules one import statement in ``package`` loads (parents aside)."""
    level, module, names = entry
    if level:
        parts = package.split(".")
        if level > len(parts):
            raise ValueError(f"{path}: relative import beyond the {PACKAGE} package")
        anchor = ".".join(parts[: len(parts) - level + 1])
        module = f"{anchor}.{module}" if module else anchor
    if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
        return []
    # `from package import x`: x is a submodule, or a name the package's __init__ defines.
    base = _locate(module, root)
    subs = []
    if base is not None and base.name == "__init__.py":
        subs = [f"{module}.{n}" for n in names if _locate(f"{module}.{n}", root) is not None]
    return subs if names and len(subs) == len(names) else [module, *subs]


def _entries(nodes) -> list[_Import]:
    entries = []
    for node in nodes:
        if isinstance(node, ast.Import):
            entries += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names if alias.name != "*")
            entries.append((node.level, node.module or "", names))
    return entries


# A line that starts an import statement. Parsing only these statements, not whole files, keeps
# a Snakemake parse fast (the whole package in a few ms instead of 150 ms).
_START = re.compile(r"^[ \t]*((?:from|import)[ \t].*)$", re.M)


@functools.cache
def _parse(path: str, mtime_ns: int) -> tuple[_Import, ...]:
    """Every import statement that starts a line of a file, at any depth (functions included).

    Keyed on the mtime, so an edited file is read again. A docstring line that reads like an
    import may add a module: harmless, one input too many.
    """
    text = Path(path).read_text(encoding="utf-8")
    entries = []
    for match in _START.finditer(text):
        statement, end = match.group(1), match.end()
        while True:
            try:
                entries += _entries(ast.parse(statement).body)
                break
            except SyntaxError:
                if end >= len(text) or not _open(statement):
                    break
                nxt = text.find("\n", end + 1)
                nxt = len(text) if nxt < 0 else nxt
                statement, end = statement + text[end:nxt], nxt
    return tuple(entries)


def _open(statement: str) -> bool:
    """Whether an import statement goes on past its last line: an open bracket or a backslash."""
    code = [line.split("#")[0] for line in statement.splitlines()]
    return sum(c.count("(") - c.count(")") for c in code) > 0 or code[-1].rstrip().endswith("\\")


@functools.cache
def _stages(path: str, mtime_ns: int) -> tuple[tuple[str, tuple[_Import, ...]], ...]:
    """(command, its handler's import statements) of every ``stage(...)`` call in ``parser()``."""
    tree = ast.parse(Path(path).read_bytes(), path)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if "parser" not in functions:
        raise ValueError(f"{path}: no parser() function registering the stages")
    stages = []
    for call in ast.walk(functions["parser"]):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id == "stage" and len(call.args) >= 2
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[1], ast.Name)):
            handler = functions[call.args[1].id]
            stages.append((call.args[0].value, tuple(_entries(ast.walk(handler)))))
    return tuple(stages)
