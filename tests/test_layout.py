"""The package's layout, read from its source with `ast`: imports only go one way (no cycle, counting imports inside
functions; nothing in the library imports the command line), every function fits on a screen or two, every module
has one job's worth of lines, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "momjax"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from momjax import generation` imports the module momjax.generation
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import momjax.hf.tensors` counts momjax.hf.tensors
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle():
    edges = graph()
    # The package's __init__ re-exports the public API from everywhere; modules importing `momjax` itself would
    # close a loop through it, so count it as a node like any other.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_command_line():
    offenders = sorted(name for name, deps in graph().items()
                       if not name.startswith("momjax.cli") and any(d.startswith("momjax.cli") for d in deps))
    assert not offenders, f"library modules importing momjax.cli: {offenders}"


def test_functions_fit_and_modules_have_one_job():
    long_functions, long_modules = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({n} lines)")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"


def test_no_private_names_across_modules():
    """`from momjax.x import _name` and `module._name` on another momjax module are reaching into its inside."""
    mods = modules()
    offenders = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> momjax module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("momjax"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("momjax") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert not offenders, offenders


def test_the_layout_is_documented():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    for name in modules():
        if name.endswith("__main__"):
            continue
        short = name.removeprefix("momjax.").replace(".", "/")
        assert short in doc or name == "momjax", f"docs/ARCHITECTURE.md does not say where {name} fits"


@pytest.mark.parametrize("module", ["momjax.errors", "momjax.units", "momjax.config", "momjax.policy"])
def test_the_bottom_floor_imports_nothing_of_the_package_above_it(module):
    allowed = {"momjax.errors", "momjax.config"}
    deps = graph()[module]
    assert deps <= allowed, f"{module} imports {sorted(deps - allowed)}"


def test_module_files_are_where_the_graph_reads_them():
    assert os.path.isfile(PACKAGE / "cli" / "__init__.py") and "momjax.cli.generate" in modules()
