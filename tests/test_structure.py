"""The shape of the house (issue 14): every module imports on its own, no import cycles inside torch_mosa (deferred
function-level and TYPE_CHECKING imports included), ops stands below layers, and the library never imports its
command line."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch_mosa

PACKAGE_DIR = Path(torch_mosa.__file__).parent


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of torch_mosa (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("torch_mosa", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """{module: the torch_mosa modules it imports anywhere in its source}. `from P import name` counts as an
    import of P.name when that is a module, else of P."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                              for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:  # `import torch_mosa.a.b` imports the module a.b
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_every_module_imports_alone():
    """Each module imported first, in a fresh set of torch_mosa modules (third-party ones stay loaded: cheap).
    The Triton kernel modules (`triton_*`) need the optional Triton package: without it they are left out, and the
    dispatch points never import them (README: Triton is optional)."""
    names = [name for name in module_files() if not name.endswith("__main__")]
    if importlib.util.find_spec("triton") is None:
        names = [name for name in names if not name.rsplit(".", 1)[-1].startswith("triton_")]
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'torch_mosa' or m.startswith('torch_mosa.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-1).strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE_DIR.parent)
    assert result.returncode == 0, f"modules that fail to import alone:\n{result.stdout}{result.stderr[-2000:]}"


def test_no_import_cycles():
    assert import_cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_ops_imports_nothing_from_layers():
    graph = import_graph()
    for name in graph:
        if name == "torch_mosa.ops" or name.startswith("torch_mosa.ops."):
            below = sorted(m for m in reachable(graph, name) if m.startswith("torch_mosa.layers"))
            assert below == [], f"{name} imports (directly or through others) {below}"


def test_library_does_not_import_the_cli():
    graph = import_graph()
    for name, targets in graph.items():
        if name != "torch_mosa.cli" and not name.startswith("torch_mosa.cli."):
            cli = sorted(t for t in targets if t == "torch_mosa.cli" or t.startswith("torch_mosa.cli."))
            assert cli == [], f"{name} imports the command line {cli}"
