"""The shape of the code: lint, layers that point one way, no import circles, small modules, light imports."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# orchestration -> model_worker -> memory_service -> protos: a module imports its own layer or lower ones only.
LAYERS = {"protos": 0, "memory_service": 1, "model_worker": 2, "orchestration": 3}
MAX_MODULE_LINES = 500


def modules() -> dict[str, Path]:
    """Every hand-written module of the four packages, by dotted name (generated stubs excluded)."""
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports anywhere in it (inside functions too: lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from pkg import mod` names a module, `from mod import func` does not
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own face excluded from its submodules' edges)."""
    found = modules()
    graph = {}
    for name, path in found.items():
        graph[name] = {m for m in imports_of(path, set(found)) if m != name and not name.startswith(m + ".")}
    return graph


def test_lint_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_point_one_way():
    wrong = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]]
    assert not wrong, "imports that point up a layer (orchestration -> model_worker -> memory_service -> protos):\n" + \
        "\n".join(wrong)


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_module_is_over_the_size_limit():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (one concept each: split them): {big}"


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(result.stdout.split())


def test_the_client_does_not_load_the_storage_engine():
    loaded = _loaded_after_import("memory_service.client")
    assert not {"lmdb", "memory_service.store", "memory_service.server", "memory_service.servicer", "ray"} & loaded


def test_hashing_and_model_math_load_no_transport():
    assert not {"grpc", "lmdb", "ray", "torch"} & _loaded_after_import("memory_service.hashing")
    for module in ("model_worker.model", "model_worker.engram"):
        assert not {"grpc", "lmdb", "ray"} & _loaded_after_import(module), module


def test_importing_never_compiles_a_missing_native_library(tmp_path):
    """Without the built library the numpy paths run, after one warning; nothing is compiled at import."""
    if not (ROOT / "memory_service" / "fastpath.c").exists():
        pytest.skip("no kernel source")
    copy = tmp_path / "memory_service"
    shutil.copytree(ROOT / "memory_service", copy, ignore=shutil.ignore_patterns("_fastpath*", "__pycache__"))
    code = "from memory_service import native; print(native.available())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert result.stdout.strip() == "False"
    assert result.stderr.count("native kernels not built") == 1, result.stderr
    assert not list(copy.glob("_fastpath*")), "the library was compiled at import time"
