"""The layering rule, checked on the source: lower layers never import upper ones.

Layers, lowest first: ``dht.peer`` (identity, transports, streams, RPC), ``dht`` (the DHT proper),
``averaging``, ``verification``, ``swarm``. A module may import its own layer and any lower one,
never a higher one; ``dht`` (both layers) never imports torch, and only ``swarm`` imports
prometheus_client. Every import statement counts,
including ones inside functions and ``TYPE_CHECKING`` blocks, since each is a dependency a reader
has to follow.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ["dht.peer", "dht", "averaging", "verification", "swarm"]  # lowest first
# prometheus_client: the lower layers keep plain counters, swarm.metrics reads them at scrape time
FORBIDDEN_IN = {"dht.peer": {"torch", "prometheus_client"}, "dht": {"torch", "prometheus_client"},
                "averaging": {"prometheus_client"}, "verification": {"prometheus_client"}}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (longest matching prefix), or None for a third party."""
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module ``path`` imports; relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # "from dht import peer" imports the dht.peer module
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if layer_of(f"{target}.{alias.name}") != layer_of(target)]
    return found


def library_files() -> list[pathlib.Path]:
    return sorted(p for top in ("dht", "averaging", "verification", "swarm") for p in (ROOT / top).rglob("*.py"))


def violations(path: pathlib.Path) -> list[str]:
    own = layer_of(module_name(path))
    assert own is not None, path
    rank = LAYERS.index(own)
    bad = []
    for line, target in imported_modules(path):
        other = layer_of(target)
        if other is not None and LAYERS.index(other) > rank:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({other}, a higher layer)")
        if target.split(".")[0] in FORBIDDEN_IN.get(own, ()):
            bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target}")
    return bad


def test_every_library_module_is_checked():
    names = {module_name(p) for p in library_files()}
    assert {"dht.peer.p2p", "dht.peer.handshake", "dht.node", "averaging.allreduce", "averaging.tensor_wire",
            "swarm.cli"} <= names


def test_no_layer_imports_a_higher_one():
    bad = [line for path in library_files() for line in violations(path)]
    assert not bad, "\n".join(bad)


def test_peer_layer_never_imports_the_dht():
    for path in (ROOT / "dht" / "peer").rglob("*.py"):
        for _, target in imported_modules(path):
            assert layer_of(target) != "dht", f"{path.relative_to(ROOT)} imports {target}"


@pytest.mark.parametrize("source, expected", [
    ("from dht.node import DHTNode\n", "imports dht.node (dht, a higher layer)"),
    ("from ..node import DHTNode\n", "imports dht.node (dht, a higher layer)"),
    ("from dht import node\n", "imports dht (dht, a higher layer)"),
    ("import torch\n", "imports torch"),
    ("def f():\n    import averaging.averager\n", "imports averaging.averager (averaging, a higher layer)"),
])
def test_checker_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    """The checker itself: a peer-layer module with an upward import is reported."""
    fake_root = tmp_path
    (fake_root / "dht" / "peer").mkdir(parents=True)
    module = fake_root / "dht" / "peer" / "bad.py"
    module.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    found = violations(module)
    assert any(expected in line for line in found), found
