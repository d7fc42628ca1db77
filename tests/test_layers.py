"""The package's layers: each imports only the layers below it, and no module imports itself in a circle.

The folder tree is the architecture (docs/architecture.md): ``core`` < ``io`` < ``model`` <
``evaluation`` < ``training`` < ``operations`` < ``predict_config`` < ``engines`` < ``predict``
< ``cli``. Every import counts, the ones inside functions and under ``TYPE_CHECKING`` too: a
lazy import upwards is still a layer leak (the engines' registry was reached back into that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "pneumobatch"

#: layer of each top-level part of the package, bottom first; a module may import its own
#: layer and the ones below it. ``testing`` (synthetic DICOMs for tests and demos) sits on io.
LAYERS = {
    "core": 0,
    "io": 1,
    "testing": 1.5,
    "model": 2,
    "evaluation": 3,
    "training": 4,
    "operations": 5,
    "predict_config": 6,
    "engines": 7,
    "predict": 8,
    "cli": 9,
    "__main__": 10,
}

#: parts that must never import torch (the report, calibrate and monitor run without it, and so does
#: predict on ONNX Runtime: model.store, model.decoding, model.runtime)
TORCH_FREE = (
    "core",
    "io",
    "evaluation",
    "operations",
    "predict_config",
    "model.applicability.stats",
    "model.store",
    "model.decoding",
    "model.runtime",
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``name`` imports (all levels; ``from pkg import sub`` names the submodule)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    top = root.name
    return {
        name: {m for m in imports(path, name, known) if m == top or m.startswith(top + ".")} - {name}
        for name, path in found.items()
    }


def layer(module: str) -> float:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: __version__ only, importable from anywhere
        return -1
    return LAYERS[parts[1]]


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer(b) > layer(a))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    tops = {name.split(".")[1] for name in modules(PACKAGE) if "." in name}
    assert tops <= set(LAYERS), f"parts without a layer in tests/test_layers.py: {sorted(tops - set(LAYERS))}"


def test_imports_run_only_downward():
    assert upward_imports(graph(PACKAGE)) == []


def test_no_module_imports_itself_in_a_circle():
    assert circles(graph(PACKAGE)) == []


@pytest.mark.parametrize("part", TORCH_FREE)
def test_torch_free_parts_never_import_torch(part: str):
    prefix = f"pneumobatch.{part}"
    found = modules(PACKAGE)
    offenders = [
        name
        for name, path in found.items()
        if (name == prefix or name.startswith(prefix + "."))
        and any(
            m == "torch" or m.startswith("torch.") or m.startswith("torchvision")
            for m in imports(path, name, set(found))
        )
    ]
    assert offenders == []


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path: Path):
    """The walker itself: a package whose core reaches up into cli, and two io modules in a circle."""
    root = tmp_path / "pneumobatch"
    for rel, text in {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/card.py": "def f():\n    from pneumobatch.cli import main\n",
        "io/__init__.py": "",
        "io/a.py": "from pneumobatch.io import b\n",
        "io/b.py": "from . import a\n",
        "cli.py": "from pneumobatch.core.card import f\nmain = f\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    edges = graph(root)
    assert upward_imports(edges) == ["pneumobatch.core.card -> pneumobatch.cli"]
    assert ["pneumobatch.io.a", "pneumobatch.io.b"] in circles(edges)
