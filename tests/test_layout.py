"""The package's layout, from the code's own imports: no import cycle, and no module importing
from a module in a layer above its own. The layers and the one line per module are those of
docs/ARCHITECTURE.md, so the page cannot drift from the code."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
LAYER = re.compile(r"^### Layer (\d+): ")
ENTRY = re.compile(r"^- `(amalgam(?:\.[\w]+)*)`: \S")


def module_files(src: Path = SRC) -> dict[str, Path]:
    """{dotted module name: file} of every module of the amalgam package."""
    out = {}
    for p in sorted((src / "amalgam").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The amalgam modules `name` imports, lazy imports inside functions included, and the
    packages whose __init__ such an import runs (a package's own modules excepted)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
            ]
        for t in targets:
            while t and t not in modules:  # `import amalgam.x.y as z` of a name in a module
                t = t.rpartition(".")[0]
            if not t:
                continue
            found.add(t)
            parent = t.rpartition(".")[0]
            while parent and parent != "amalgam":  # importing a.b.c runs a.b's __init__ first
                if not name.startswith(parent + ".") and name != parent:
                    found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    found.discard("amalgam")  # the root package imports nothing on import (lazy exports)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(src)
    return {n: imports_of(n, p, modules) for n, p in modules.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One import cycle ([a, b, ..., a]), or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = 2
        return []

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return []


def read_layers(doc: Path = DOC) -> tuple[dict[str, int], list[str]]:
    """({module: layer} from the page's `### Layer N: ...` sections, [modules listed twice])."""
    layers: dict[str, int] = {}
    twice: list[str] = []
    layer = None
    for line in doc.read_text().splitlines():
        if m := LAYER.match(line):
            layer = int(m.group(1))
        elif line.startswith("## "):
            layer = None
        elif layer is not None and (m := ENTRY.match(line)):
            if m.group(1) in layers:
                twice.append(m.group(1))
            layers[m.group(1)] = layer
    return layers, twice


def upward_imports(graph: Mapping[str, set[str]], layers: Mapping[str, int]) -> list[str]:
    """'a (layer i) imports b (layer j > i)' for every import that climbs a layer."""
    return sorted(
        f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
        for a, deps in graph.items()
        for b in deps
        if layers[b] > layers[a]
    )


# ------------------------------------------------------------------------------ the checkers


def test_the_checkers_catch_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    layers = {"a": 0, "b": 1, "c": 1}
    assert upward_imports({"a": {"b"}, "b": {"c"}, "c": set()}, layers) == [
        "a (layer 0) imports b (layer 1)"
    ]


def test_lazy_imports_and_package_inits_count(tmp_path):
    pkg = tmp_path / "amalgam"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from amalgam.sub.leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "top.py").write_text("def f():\n    from amalgam.sub.leaf import x\n    return x\n")
    (pkg / "low.py").write_text("from . import top\n")
    graph = import_graph(tmp_path)
    assert graph["amalgam.top"] == {"amalgam.sub.leaf", "amalgam.sub"}
    assert graph["amalgam.sub"] == {"amalgam.sub.leaf"}  # its own module: no edge back to itself
    assert graph["amalgam.low"] == {"amalgam.top"}


# ------------------------------------------------------------------------------ the package


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_on_the_architecture_page_once():
    layers, twice = read_layers()
    modules = set(module_files())
    assert not twice, f"listed twice in docs/ARCHITECTURE.md: {twice}"
    assert not modules - set(layers), (
        f"modules missing from docs/ARCHITECTURE.md (add a line under their layer): "
        f"{sorted(modules - set(layers))}"
    )
    assert not set(layers) - modules, f"listed but gone: {sorted(set(layers) - modules)}"


def test_no_module_imports_from_a_layer_above_it():
    layers, _ = read_layers()
    graph = {n: deps for n, deps in import_graph().items() if n in layers}
    assert upward_imports(graph, layers) == []
