"""The import graph, read from the folders as they are (relative imports resolved):
every unit imports only what ``LAYERS`` allows it (STYLE.md 4), no module imports
itself back through others, and no merge leaves its conflict markers behind.

``LAYERS`` is the one table of the architecture, outermost first; it must name every
package and shared module there is, so a new one cannot slip in unplaced.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "apcm.server", "client": "apcm.client", "wire": "apcm.wire",
           "tools": "apcm.tools"}
TEXT_SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".txt", ".json", ".cfg"}
S = "apcm.server."
SHARED = {S + "config", S + "errors", S + "metrics", S + "fsutil", S + "code_dtypes",
          S + "startup_log"}

# unit -> the units it may import (besides itself). A unit is a top-level package
# (apcm.client, apcm.wire, apcm.tools), a server subpackage or a server module.
LAYERS: dict[str, set[str]] = {
    "apcm.tools": {"apcm.client", "apcm.wire", "apcm.v1"} | {
        S + u for u in ("allocator", "api", "cluster", "codecs", "config", "domain", "rpc",
                        "embedding", "memory", "persistence", "errors", "metrics")},
    S + "cli": {S + "commands"},
    S + "commands": {S + "api", S + "config", S + "startup_log"},
    S + "api": {S + "allocator", S + "browser", S + "cluster", S + "codecs", S + "domain",
                S + "rpc",
                "apcm.v1", "apcm.wire"} | SHARED,
    # the cluster never imports the domain: api.app builds the node and hands it in
    S + "cluster": {S + "memory", S + "persistence", S + "rpc", "apcm.v1",
                    "apcm.wire"} | SHARED,
    # the memory browser: a web page over the domain layer (started by api)
    S + "browser": {S + "domain", S + "memory"} | SHARED,
    # what api and cluster share: status mapping and proto conversions of domain values
    S + "rpc": {S + "memory", "apcm.v1", "apcm.wire"} | SHARED,
    S + "domain": {S + "codecs", S + "embedding", S + "memory", S + "persistence"} | SHARED,
    S + "persistence": {S + "memory", S + "config", S + "errors", S + "fsutil"},
    S + "memory": {S + "code_dtypes", S + "errors"},
    S + "codecs": {S + "code_dtypes", S + "errors", S + "fsutil"},
    S + "embedding": {S + "errors", S + "fsutil"},
    S + "allocator": set(),
    S + "config": set(),
    S + "errors": {"apcm.wire"},
    S + "metrics": set(),
    S + "startup_log": set(),
    S + "fsutil": set(),
    S + "code_dtypes": set(),
    "apcm.client": {"apcm.v1", "apcm.wire"},
    "apcm.wire": {"apcm.v1"},
}
# third-party imports a unit must not make: the layers below the edge know no gRPC,
# and banks and persistence no neural-network code
NO_THIRD_PARTY = {
    S + "memory": ("grpc", "torch.nn", "nats"),
    S + "persistence": ("grpc", "torch.nn", "nats"),
    S + "domain": ("grpc", "nats"),
    S + "codecs": ("grpc", "nats"),
    S + "api": ("nats",),  # the cluster extra: only the cluster package needs it
}


def _module(path: Path) -> tuple[str, str]:
    """(module name, the package its relative imports start from)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def _imports(path: Path, package: str) -> set[str]:
    """Every name a file imports, relative imports resolved, TYPE_CHECKING ones too.
    ``from pkg import name`` imports ``pkg.name`` where that is a module, else ``pkg``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                names.add(sub if sub in MODULES or not module.startswith("apcm.") else module)
                if not module.startswith("apcm."):
                    names.add(module)
    return names


def _unit(name: str) -> str | None:
    parts = name.split(".")
    if name.startswith(S):
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if name.startswith("apcm.") and len(parts) > 1 else None


def _files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


MODULES = {_module(p)[0]: p for p in _files()}


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for imported in _imports(path, _module(path)[1]):
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_the_table_places_every_unit_and_allows_only_known_ones() -> None:
    units = {_unit(m) for m in MODULES} - {None, "apcm.server", "apcm.v1"}
    assert units - set(LAYERS) == set(), "units the layer table does not place"
    allowed = set().union(*LAYERS.values())
    assert allowed - set(LAYERS) - {"apcm.v1"} == set(), "the table names unknown units"


@pytest.mark.parametrize("unit", sorted(LAYERS))
def test_a_unit_imports_only_what_the_table_allows(unit: str) -> None:
    files = [m for m in MODULES if _unit(m) == unit]
    assert files, f"no module belongs to {unit}"
    bad = []
    for module in files:
        path = MODULES[module]
        for name in sorted(_imports(path, _module(path)[1])):
            target = _unit(name)
            if target is not None and target not in (unit, "apcm.server") \
                    and target not in LAYERS[unit]:
                bad.append(f"{module} imports {name}")
            if any(name == f or name.startswith(f + ".") for f in NO_THIRD_PARTY.get(unit, ())):
                bad.append(f"{module} imports {name}")
    assert not bad, bad


def test_the_graph_resolves_relative_imports() -> None:
    """The resolver itself: a relative import two levels up lands on the right module."""
    graph = _graph()
    assert S + "memory.bank" in graph[S + "memory.store"]
    assert S + "errors" in graph[S + "memory.bank"]
    assert S + "domain.service" in graph[S + "api.servicer"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_module_imports_itself_back() -> None:
    assert not _cycles(_graph()), _cycles(_graph())


def test_no_unit_imports_itself_back() -> None:
    """Between packages too: api and cluster, say, may not import each other."""
    graph = _graph()
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = _unit(module)
        units.setdefault(str(src), set()).update(
            str(_unit(t)) for t in targets if _unit(t) not in (src, "apcm.server"))
    assert not _cycles(units), _cycles(units)


def test_no_file_holds_merge_conflict_markers() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    marked = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        marked += [f"{name}:{i + 1}" for i, line in enumerate(lines)
                   if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not marked, marked
