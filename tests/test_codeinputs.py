"""A stage's code inputs from the static import graph, and the rules that should use them."""

import ast
import re
from pathlib import Path

import pytest

from pipeline.__main__ import parser
from pipeline.codeinputs import _parse, module_files, stage_module, stage_modules

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pipeline"
RULES = ROOT / "workflow" / "rules"


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def paths(root, *names):
    return sorted(str(root / "pipeline" / n) for n in names)


@pytest.fixture
def tiny(tmp_path):
    """A package with lazy, relative and package imports; `unused` nothing imports."""
    write(tmp_path, {
        "pipeline/__init__.py": "NAME = 1\n",
        "pipeline/a.py": ("import numpy as np\n\nfrom pipeline import NAME\n\n\n"
                          "def f():\n    from pipeline.b import g\n\n    return g\n"),
        "pipeline/b.py": "from . import c\n\n\ndef g():\n    return c\n",
        "pipeline/c.py": "import os\n",
        "pipeline/h.py": "from pipeline.pkg import CONST, d\n",
        "pipeline/i.py": "import pipeline.pkg.e as e\n",
        "pipeline/pkg/__init__.py": "CONST = 2\n",
        "pipeline/pkg/d.py": "from .e import (\n    g,  # (comment)\n)\n",
        "pipeline/pkg/e.py": "from .. import c\n\n\ndef g():\n    return c\n",
        "pipeline/unused.py": "from pipeline import a\n",
        "pipeline/__main__.py": (
            "def _one(a):\n    from pipeline.a import f\n\n    f()\n\n\n"
            "def _two(a):\n    from pipeline.pkg import d\n    from pipeline.h import CONST\n\n\n"
            "def parser():\n    def stage(name, fn):\n        return fn\n\n"
            "    s = stage('one', _one)\n    stage('two', _two)\n    return s\n"),
    })
    return tmp_path


def test_tiny_package_follows_lazy_relative_and_package_imports_with_parents(tiny):
    assert module_files("pipeline.a", root=tiny) == paths(tiny, "__init__.py", "a.py", "b.py",
                                                          "c.py")
    pkg = ["__init__.py", "pkg/__init__.py", "pkg/d.py", "pkg/e.py", "c.py"]
    assert module_files("pipeline.pkg.d", root=tiny) == paths(tiny, *pkg)
    # A name from the package's __init__ beside a submodule; `import a.b.c` loads a and a.b.
    assert module_files("pipeline.h", root=tiny) == paths(tiny, *pkg, "h.py")
    assert module_files("pipeline.i", root=tiny) == paths(tiny, "__init__.py", "i.py",
                                                          "pkg/__init__.py", "pkg/e.py", "c.py")
    assert module_files("pipeline.pkg", root=tiny) == paths(tiny, "__init__.py",
                                                            "pkg/__init__.py")
    assert module_files("pipeline.c", "pipeline.b", "pipeline.c", root=tiny) == paths(
        tiny, "__init__.py", "b.py", "c.py")


def test_unknown_modules_raise_with_their_name(tiny):
    with pytest.raises(ValueError, match=r"unknown module 'pipeline\.nope'"):
        module_files("pipeline.a", "pipeline.nope", root=tiny)
    with pytest.raises(ValueError, match=r"unknown module 'numpy'"):
        module_files("numpy", root=tiny)
    (tiny / "pipeline" / "c.py").write_text("def f():\n    from pipeline.gone import x\n")
    with pytest.raises(ValueError, match=r"'pipeline\.gone'.*imported by .*c\.py"):
        module_files("pipeline.b", root=tiny)


def test_an_edited_file_is_read_again(tiny):
    assert module_files("pipeline.c", root=tiny) == paths(tiny, "__init__.py", "c.py")
    c = tiny / "pipeline" / "c.py"
    c.write_text("from pipeline import unused\n")
    before = c.stat().st_mtime_ns
    c.touch()
    assert c.stat().st_mtime_ns != before or pytest.skip("file system mtime too coarse")
    assert module_files("pipeline.c", root=tiny) == paths(tiny, "__init__.py", "a.py", "b.py",
                                                          "c.py", "unused.py")


def test_tiny_stages_map_to_their_handlers_imports(tiny):
    assert stage_modules(tiny) == {"one": ("pipeline.a",),
                                   "two": ("pipeline.pkg.d", "pipeline.h")}
    with pytest.raises(ValueError, match=r"unknown stage 'three'.*known: one, two"):
        stage_module("three", root=tiny)


def full_parse(path):
    """Reference: every import node of the whole syntax tree."""
    found = []
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names if a.name != "*")
            found.append((node.level, node.module or "", names))
    return sorted(found)


def test_line_scan_finds_the_same_imports_as_a_full_parse_in_every_project_file():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        assert sorted(_parse(str(path), path.stat().st_mtime_ns)) == full_parse(path), path


def lazy_imports(path):
    """Absolute `pipeline` modules imported inside functions of one file."""
    tree = ast.parse(path.read_bytes())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    return {n.module for f in functions for n in ast.walk(f)
            if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module.startswith("pipeline.")}


def test_evaluate_files_include_its_lazy_imports_and_not_what_it_never_imports():
    files = set(module_files("pipeline.evaluate"))
    for name in ("__init__.py", "evaluate.py", "io.py", "train/__init__.py", "train/encoder.py"):
        assert str(PKG / name) in files
    # evaluate imports the encoder loader only inside a function (to read a .pt encoder).
    lazy = lazy_imports(PKG / "evaluate.py")
    assert lazy
    for module in lazy:
        assert set(module_files(module)) <= files, module
    for name in ("figures.py", "aggregate.py", "latent.py", "neighbours.py", "prepare.py",
                 "train/loop.py"):
        assert str(PKG / name) not in files


def test_every_registered_stage_maps_to_existing_modules():
    assert stage_module("evaluate") == ("pipeline.evaluate",)
    stages = stage_modules()
    registered = re.search(r"\{([^}]*)\}", parser().format_usage()).group(1).split(",")
    assert sorted(stages) == sorted(registered)
    for command, modules in stages.items():
        assert modules, command
        assert module_files(*modules), command  # raises for an unknown module
    with pytest.raises(ValueError, match="unknown stage 'evaluat'"):
        stage_module("evaluat")


_HEAD = re.compile(r"^(?:rule (\w+)|use rule (\w+) as (\w+) with):", re.M)
_COMMAND = re.compile(r"python -m pipeline(?:\s+--\S+\s+\S+)*\s+([a-z][a-z0-9-]*)")
_CODE = re.compile(r"^\s+code=(.+?),?\s*$", re.M)


def top_level_names(text):
    """NAME -> expression text of each top-level `NAME = ...` of a rule file."""
    names, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"([A-Za-z_]\w*) = ", line):
            for j in range(i + 1, min(i + 30, len(lines)) + 1):
                try:
                    names[m.group(1)] = ast.unparse(ast.parse("\n".join(lines[i:j])).body[0].value)
                    break
                except SyntaxError:
                    continue
    return names


def rules():
    """Every rule of workflow/rules/*.smk: name -> [command of its shell, its `code=` text],
    where a `use rule ... with:` inherits what it does not override."""
    found, names, bases = {}, {}, {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        names.update(top_level_names(text))
        for head in _HEAD.finditer(text):
            # The body: indented lines up to the next line at column 0.
            rest = text[head.end():]
            body = rest[: m.start()] if (m := re.search(r"^\S", rest, re.M)) else rest
            shell = body.split("shell:", 1)[1] if "shell:" in body else ""
            command = _COMMAND.search("".join(re.findall(r'"([^"]*)"', shell)))
            code = _CODE.search(body)
            name = head.group(1) or head.group(3)
            found[name] = [command and command.group(1), code and code.group(1)]
            bases[name] = head.group(2)
    for name, base in bases.items():
        if base:
            found[name] = [a or b for a, b in zip(found[name], found[base], strict=True)]
    for entry in found.values():
        entry[1] = entry[1] and names.get(entry[1], entry[1])
    return found


def test_every_rule_runs_a_registered_stage():
    found = rules()
    text = "".join(smk.read_text() for smk in RULES.glob("*.smk"))
    plain = re.findall(r"^rule (\w+):", text, re.M)
    assert len(plain) > 10
    # The parser finds the command of every shell that runs the CLI (a launcher such as srun
    # may come first).
    assert sum(found[name][0] is not None for name in plain) == len(
        re.findall(r'"(?:\{params\.launch\} )?python -m pipeline', text))
    stages = stage_modules()
    for name, (command, _) in found.items():
        assert command is None or command in stages, name


def missing_files(code, command):
    """Files of the command's import graph that a hand list `sources("a.py", ...)` misses."""
    call = ast.parse(code, mode="eval").body
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "sources"):
        return []
    listed = {str(PKG / a.value) for a in call.args}
    return sorted(Path(f).relative_to(PKG).as_posix()
                  for f in set(module_files(*stage_module(command))) - listed)


def test_every_rule_takes_its_code_inputs_from_the_import_graph():
    problems = []
    for name, (command, code) in rules().items():
        want = f'code_of("{command}")'
        if code is None:
            problems.append(f"{name}: no code= input, want code={want}")
        elif code.replace("'", '"') != want:
            gaps = missing_files(code, command)
            problems.append(f"{name}: code={code}, want code={want}"
                            + (f"; misses {', '.join(gaps)}" if gaps else ""))
    if "def code_of(" not in (RULES / "common.smk").read_text():
        problems.append("common.smk: no code_of(command)")
    assert not problems, "\n".join(problems)
