"""The one-way import rules of docs/design.md, checked on every run.

import-linter cannot see this package's flows (``amoeba_profile.backends`` is the top-level
``backends/`` folder, mapped by ``package-dir``; grimp walks only the root package's folder), so the
graph is read here from the source with ``ast``: every ``import``/``from`` statement outside an
``if TYPE_CHECKING:`` block, function-level (lazy) imports included.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Higher layers may import lower ones, never the reverse.
LAYERS = ("cli", "fleet", "measure", "selection", "backends", "table", "device", "core")
BACKEND_SHARED = ("base", "common", "flows")  # what a flow may import from the backends package
# every flow folder, found rather than listed: a new flow is checked the day it is added
FLOWS = tuple(
    sorted(p.parent.name for p in (ROOT / "backends").glob("*/__init__.py") if p.parent.name not in BACKEND_SHARED)
)
TORCH_FREE = ("selection", "table", "core")  # the estimating side imports no measuring library
MEASURING_LIBRARIES = ("torch", "transformers", "onnxruntime", "tensorrt_llm", "mlc_llm", "ray", "tvm")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":
        parts.insert(0, "amoeba_profile")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules and third-party top-level packages it imports."""
    files = [*ROOT.glob("amoeba_profile/**/*.py"), *ROOT.glob("backends/**/*.py")]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        raw = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        edges = set()
        for target in raw:
            if target.startswith("amoeba_profile"):
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # a name imported from a module
                if target in modules and target != name:
                    edges.add(target)
            else:
                edges.add(target.split(".")[0])
        graph[name] = edges
    return graph


def _part(module: str, depth: int) -> str | None:
    parts = module.split(".")
    return parts[depth] if len(parts) > depth else None


def test_layers_import_only_downwards():
    wrong = []
    for source, targets in import_graph().items():
        low = _part(source, 1)
        for target in targets:
            high = _part(target, 1) if target.startswith("amoeba_profile.") else None
            if low in LAYERS and high in LAYERS and LAYERS.index(high) < LAYERS.index(low):
                wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layers " + " > ".join(LAYERS) + ":\n" + "\n".join(sorted(wrong))


def test_the_flow_folders_are_found():
    assert {"pytorch", "llama_cpp", "ort", "mlc_llm", "tensorrt_llm"} <= set(FLOWS)


def test_no_flow_imports_another_or_the_table_code():
    wrong = []
    for source, targets in import_graph().items():
        if not source.startswith("amoeba_profile.backends.") or _part(source, 2) not in FLOWS:
            continue
        for target in targets:
            if target.startswith("amoeba_profile.backends."):
                other = _part(target, 2)
                if other != _part(source, 2) and other not in BACKEND_SHARED:
                    wrong.append(f"{source} -> {target}")
    assert not wrong, "a flow imports another flow:\n" + "\n".join(sorted(wrong))


def test_the_estimating_side_imports_no_measuring_library():
    wrong = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        if _part(source, 1) in TORCH_FREE
        for target in targets
        if target in MEASURING_LIBRARIES
    ]
    assert not wrong, "\n".join(sorted(wrong))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
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
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_circles():
    # a package's __init__ re-exporting its own modules is not a circle between modules
    graph = defaultdict(set)
    for source, targets in import_graph().items():
        graph[source] = {t for t in targets if not (source.startswith(t + ".") or t.startswith(source + "."))}
    assert not cycles(graph)
