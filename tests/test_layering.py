"""Layering: the sampling core loads no web, engine or model code; no import cycles inside service/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


def _loaded_after(statement: str) -> set[str]:
    """Module names in sys.modules after ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _under(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_sampling_core_loads_no_web_engine_or_api() -> None:
    loaded = _loaded_after("import service.sampling")
    assert not _under(loaded, "fastapi", "pydantic", "starlette", "service.engine", "service.api")


def test_engine_loads_no_web_framework() -> None:
    loaded = _loaded_after("import service.engine")
    assert not _under(loaded, "fastapi", "starlette", "service.api")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, also inside if/try (not TYPE_CHECKING)."""
    out: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the service modules it imports at import time (a package's own __init__ is not an edge)."""
    files = {_module_name(p): p for p in SERVICE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                for _ in range(node.level - 1 if node.level else 0):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                # "from pkg import name": the submodule pkg.name when there is one, else pkg itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges |= {t for t in targets if t in files and t != mod}
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_walk_sees_imports_and_cycles() -> None:
    graph = import_graph()
    assert "service.sampling.catalog" in graph["service.sampling.registry"]
    assert "service.sampling.samplers.common" in graph["service.sampling.samplers.res_singlestep"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["service.sampling", "service"])
def test_no_import_cycles(package: str) -> None:
    graph = {m: e for m, e in import_graph().items() if m == package or m.startswith(package + ".")}
    assert find_cycles(graph) == []


WEB = ("fastapi", "starlette", "pydantic", "pydantic_settings")


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module an import in ``path`` names (module level and inside functions; TYPE_CHECKING
    blocks left out: they never run), as absolute names, with their line."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for s in node.body for n in ast.walk(s)}
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1 if node.level else 0):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            out += [(name, node.lineno)] + [(f"{name}.{a.name}", node.lineno) for a in node.names]
    return out


def _offenders(package: str, banned: tuple[str, ...]) -> list[str]:
    root = SERVICE.joinpath(*package.split(".")[1:])
    return [o for path in sorted(root.rglob("*.py")) for o in _offenders_file(path, banned)]


def test_only_api_and_deploy_import_the_web_framework() -> None:
    offenders = [
        o
        for pkg in sorted({p.name for p in SERVICE.iterdir() if p.is_dir() and p.name != "__pycache__"})
        if pkg not in ("api", "deploy")
        for o in _offenders(f"service.{pkg}", WEB)
    ]
    offenders += [o for p in SERVICE.glob("*.py") for o in _offenders_file(p, WEB)]
    assert offenders == []


def _offenders_file(path: Path, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for name, line in _imports(path)
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]


def test_serving_imports_no_api_and_models_no_api_or_serving() -> None:
    assert _offenders("service.serving", ("service.api", "service.deploy", *WEB)) == []
    assert _offenders("service.models", ("service.api", "service.deploy", "service.serving")) == []


def test_serving_loads_no_web_framework_or_api() -> None:
    loaded = _loaded_after("import service.serving.service, service.serving.request, service.serving.cli")
    assert not _under(loaded, "fastapi", "pydantic", "starlette", "service.api", "service.deploy")


def _kind_switches(path: Path) -> list[str]:
    """Comparisons that read ``.conditioning`` (==, !=, in): a switch over model kinds."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "conditioning" for o in operands):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_no_model_kind_switch_outside_models() -> None:
    """A model family's behaviour is the family's (service/models): no one else asks which it is."""
    assert _kind_switches(SERVICE / "models" / "pixel.py")  # the walk finds the families' own switches
    outside = [
        hit
        for path in sorted(SERVICE.rglob("*.py"))
        if "models" not in path.parts
        for hit in _kind_switches(path)
    ]
    assert outside == []


def test_the_import_walk_sees_lazy_imports_and_skips_type_checking() -> None:
    names = {n for n, _ in _imports(SERVICE / "models" / "store.py")}
    assert "service.models.pixel" in names  # imported inside a method
    assert "service.serving.request" not in names  # under TYPE_CHECKING only


def test_translators_load_no_model() -> None:
    """The A1111 and OpenAI translators turn a body into GenerationRequests for a model they are
    handed: they reach neither the pool nor the store (the route has the pool load the model)."""
    compat = SERVICE / "api" / "compat"
    for path in (compat / "a1111_translate.py", compat / "openai_translate.py"):
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"ensure_loaded", "pool", "using", "ModelStore", "ModelPool", "Service"}, path
        assert "GenerationRequest" in names, path


def test_comfy_workflows_import_no_api_or_web_framework() -> None:
    assert _offenders("service.comfy", ("service.api", "service.deploy", *WEB)) == []
    loaded = _loaded_after("import service.comfy")
    assert not _under(loaded, "fastapi", "pydantic", "starlette", "service.api", "service.deploy")
