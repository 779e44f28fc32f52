"""The layers import downwards only (STYLE.md 4): banks and persistence know nothing of
codecs, gRPC or the API; the domain layer knows codecs but not gRPC. And no merge
leaves its conflict markers behind."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server"
TEXT_SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".txt", ".json", ".cfg"}

FORBIDDEN = {
    "memory": ("apcm.server.codecs", "apcm.server.api", "apcm.server.domain",
               "apcm.server.cluster", "grpc", "torch.nn"),
    "persistence": ("apcm.server.codecs", "apcm.server.api", "apcm.server.domain",
                    "apcm.server.cluster", "grpc", "torch.nn"),
    "domain": ("apcm.server.api", "apcm.server.cluster", "grpc"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    files = sorted((SERVER / layer).glob("*.py"))
    assert files
    bad = [f"{path.name} imports {name}" for path in files for name in sorted(_imports(path))
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert not bad, bad


def test_no_file_holds_merge_conflict_markers() -> None:
    root = SERVER.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    marked = []
    for name in tracked:
        path = root / name
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        marked += [f"{name}:{i + 1}" for i, line in enumerate(lines)
                   if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not marked, marked
