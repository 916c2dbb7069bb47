"""The package's layers: imports point one way, and no import cycle exists, not even under TYPE_CHECKING.

The layers, lowest first (docs/architecture.md describes each):

- ``base`` and ``wire`` import nothing else of camgateway (``wire`` not even ``base``);
- ``perf`` (each optional speed-up) imports only those;
- ``storage``, then ``transfer``, then ``session`` and ``delivery`` (side by side);
- ``web`` (read-only views of the running gateway), then ``runtime`` (tap, CLI,
  config, the service tree), which wires everything;
- ``sim`` (the camera emulator) imports only ``wire``, ``perf`` and ``base``.

A lower layer may name a higher layer's type for type checking only
(``if TYPE_CHECKING:``), and only the wiring object and the configuration
(``runtime.context``, ``runtime.config``): such an import never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import TestCase

import camgateway

PACKAGE = Path(camgateway.__file__).parent

#: Each layer's rank: a module may import (at run time) only from layers of lower rank, or its own.
RANK = {"base": 0, "wire": 0, "perf": 1, "storage": 2, "transfer": 3, "session": 4, "delivery": 4, "web": 5,
        "runtime": 6}
#: What the emulator may import: it speaks the wire protocol and shares the socket tuning, nothing else.
SIM_MAY_IMPORT = {"sim", "wire", "perf", "base"}
#: The higher modules a lower layer may name under TYPE_CHECKING.
TYPE_ONLY_TARGETS = {"camgateway.runtime.context", "camgateway.runtime.config"}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, bool]]:
    """``(imported module, only for type checking)`` for every camgateway import in a module, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            typing_only.update(id(inner) for inner in ast.walk(node))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("camgateway"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                targets.append(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.startswith("camgateway")]
        for target in targets:
            if target != name and target in known:
                yield target, id(node) in typing_only


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules it imports (run-time and type-checking imports alike)."""
    return {name: {target for target, _ in imports(name, path, known)} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
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


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK or parts[1:] == ["sim"]) else "top"


def wrong_way(known: dict[str, Path]) -> list[str]:
    """Every import that points up the layers, as ``a -> b``."""
    wrong = []
    for name, path in sorted(known.items()):
        mine = layer(name)
        for target, typing_only in imports(name, path, known):
            theirs = layer(target)
            if theirs == mine or "top" in (mine, theirs):
                continue
            if mine == "sim" or theirs == "sim":
                allowed = mine == "sim" and theirs in SIM_MAY_IMPORT
            elif typing_only and target in TYPE_ONLY_TARGETS:
                allowed = True
            else:
                allowed = RANK[theirs] < RANK[mine] and not (mine == "wire")
            if not allowed:
                wrong.append(f"{name} -> {target}" + (" (TYPE_CHECKING)" if typing_only else ""))
    return wrong


class LayerTests(TestCase):
    """The package as it is."""

    def test_no_import_cycles(self) -> None:
        self.assertEqual(cycles(graph(modules())), [])

    def test_imports_point_down_the_layers(self) -> None:
        self.assertEqual(wrong_way(modules()), [])

    def test_every_module_is_in_a_layer(self) -> None:
        top = sorted(name for name in modules() if layer(name) == "top" and name != "camgateway")
        self.assertEqual(top, [])

    def test_the_wire_layer_imports_nothing_else(self) -> None:
        known = modules()
        for name, path in known.items():
            if layer(name) == "wire":
                self.assertEqual({t for t, _ in imports(name, path, known) if layer(t) != "wire"}, set(), name)


class CheckerTests(TestCase):
    """The checks themselves find what they are for."""

    def test_a_cycle_is_found(self) -> None:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(edges), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_a_cycle_under_type_checking_is_found(self) -> None:
        root = Path(self.mktemp()) / "camgateway"
        (root / "wire").mkdir(parents=True)
        (root / "__init__.py").write_text("")
        (root / "wire" / "__init__.py").write_text("")
        (root / "wire" / "a.py").write_text("from camgateway.wire import b\n")
        (root / "wire" / "b.py").write_text(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from camgateway.wire.a import x\n")
        self.assertEqual(cycles(graph(modules(root))), [["camgateway.wire.a", "camgateway.wire.b"]])

    def test_an_upward_import_is_found(self) -> None:
        root = Path(self.mktemp()) / "camgateway"
        for folder in ("storage", "session", "runtime"):
            (root / folder).mkdir(parents=True)
            (root / folder / "__init__.py").write_text("")
        (root / "__init__.py").write_text("")
        (root / "runtime" / "context.py").write_text("")
        (root / "session" / "s.py").write_text("")
        (root / "storage" / "x.py").write_text(
            "from camgateway.session import s\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from camgateway.runtime.context import Services\n")
        self.assertEqual(wrong_way(modules(root)), ["camgateway.storage.x -> camgateway.session.s"])
