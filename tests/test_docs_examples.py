"""Every fenced code block in README.md and docs/*.md runs, as a user would copy it.

A user copies the examples first, so each block is a test, named by file and line:

- ``python`` blocks run as written against one real server per module (the
  default text model with its real MiniLM embedder, like tests/test_text_memory.py).
  The one substitution is the address: ``localhost:50051`` becomes the test
  server's. Each block runs twice (examples must be re-runnable), and when it
  prints, the doc must show what it prints in a ``text`` block marked
  ``<!-- doc-test: output -->`` right after it; both runs must print that (floats
  to within 0.01).
- ``sh`` / ``bash`` / ``console`` blocks run in bash from a scratch folder with the
  virtualenv first on PATH, ``localhost:50051`` / ``localhost:9090`` pointing at the
  test server's gRPC / metrics ports. A block that uses a tool that is not
  installed (grpcurl, kubectl, ...) skips and names it.
- ``json`` blocks must parse; an MCP host configuration's command must start.
- Anything that cannot run here (``make serve``, ``docker``, a real cluster)
  carries ``<!-- doc-test: skip — <reason> -->`` on the line before its fence.
- A block that needs more than a plain server says so in the doc, on the line
  before its fence: ``<!-- doc-test: needs — <what> -->``. "an API key in
  APCM_API_KEY" runs it against a text server with that key (and sets the
  variable); "the mTLS server" against the mTLS server of docs/deploy.md §4, in
  the folder of the certificates its openssl block makes. Nothing else is set
  up: a block that reads a variable or a file without saying so fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEXT_MODEL, server_settings
from prometheus_client import CollectorRegistry

from apcm.server.api.app import ApcmServer, build_server

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(
    r"^\s*<!--\s*doc-test:\s*(?P<kind>[\w-]+)\s*(?:[—:-]+\s*(?P<reason>.*?))?\s*-->\s*$")
PYTHON = {"python", "py"}
SHELL = {"sh", "bash", "shell", "console"}
# Tools a shell block may need; absent ones skip the block (CI installs what it can).
TOOLS = ("grpcurl", "kubectl", "kustomize", "promtool", "openssl", "curl", "docker")
FLOAT = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")
# what a ``doc-test: needs`` marker may ask for
NEEDS = ("the mTLS server", "an API key in APCM_API_KEY")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # "", "skip" or "output"
    reason: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def find_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the doc-test marker on the line before."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: unclosed code fence"
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(path, start + 1, lang.lower(), "\n".join(body) + "\n",
                            marker["kind"] if marker else "", (marker["reason"] or "") if marker
                            else ""))
        i += 1
    return blocks


BLOCKS = [b for path in DOC_FILES for b in find_blocks(path)]


def output_of(block: Block) -> Block | None:
    """The ``<!-- doc-test: output -->`` block right after ``block``, if any."""
    same_file = [b for b in BLOCKS if b.path == block.path]
    later = [b for b in same_file if b.line > block.line]
    return later[0] if later and later[0].marker == "output" else None


def outputs_match(got: str, want: str) -> bool:
    """Line by line, floats within 0.01, everything else exact (trailing spaces aside)."""
    got_lines, want_lines = got.rstrip().splitlines(), want.rstrip().splitlines()
    if len(got_lines) != len(want_lines):
        return False
    for g, w in zip(got_lines, want_lines, strict=True):
        g, w = g.rstrip(), w.rstrip()
        if FLOAT.split(g) != FLOAT.split(w):
            return False
        if any(abs(float(a) - float(b)) > 0.01
               for a, b in zip(FLOAT.findall(g), FLOAT.findall(w), strict=True)):
            return False
    return True


# ------------------------------------------------------------------ the servers


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    """The default text model with its real embedder, metrics served."""
    settings = server_settings(TEXT_MODEL, tmp_path_factory.mktemp("docs-data"),
                               default_bank_capacity=256, metrics_port=0)
    srv, _ = build_server(settings, registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where blocks run: a scratch clone (links to the repository's top-level entries), so
    paths like ``deploy/k8s/base`` resolve and files a block makes stay out of the tree."""
    work = tmp_path_factory.mktemp("docs-cwd")
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (work / entry.name).symlink_to(entry)
    return work


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def keyed_server(api_key: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    """The text server again, with a read-write API key (docs/deploy.md §2)."""
    settings = server_settings(TEXT_MODEL, tmp_path_factory.mktemp("docs-keyed-data"),
                               default_bank_capacity=256, api_keys=api_key)
    srv, _ = build_server(settings, registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture(scope="module")
def tls_server(api_key: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApcmServer, Path]]:
    """The mTLS server with an API key that docs/deploy.md §4 starts, on the certificates
    its openssl block makes (text model, vectors only: its blocks send no text), and the
    folder of those certificates, where the TLS blocks run."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    (certs,) = [b for b in BLOCKS if "openssl req -x509" in b.code]
    workdir = tmp_path_factory.mktemp("docs-certs")
    run_shell(certs.code, "", "", workdir, {})
    settings = server_settings(
        TEXT_MODEL, tmp_path_factory.mktemp("docs-tls-data"), embedder="none",
        tls_cert=str(workdir / "server.pem"), tls_key=str(workdir / "server.key"),
        tls_client_ca=str(workdir / "ca.pem"), api_keys=api_key)
    srv, _ = build_server(settings, registry=CollectorRegistry())
    srv.start()
    yield srv, workdir
    srv.stop(grace=0.5)


# ------------------------------------------------------------------ runners


def run_python(block: Block, address: str, workdir: Path) -> str:
    code = compile(block.code.replace("localhost:50051", address), block.name, "exec")
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__main__"})  # noqa: S102 - running the docs is the point
    finally:
        os.chdir(cwd)
    return out.getvalue()


def shell_script(block: Block) -> str:
    if block.lang != "console":
        return block.code
    return "\n".join(line[2:] for line in block.code.splitlines() if line.startswith("$ "))


def missing_tool(script: str) -> str | None:
    for tool in TOOLS:
        uses = re.search(rf"(^|[;&|(]\s*|\$\(\s*)({tool})\s", script, re.M)
        if uses and not shutil.which(tool):
            return tool
    return None


def run_shell(script: str, grpc: str, metrics: str, workdir: Path, env: dict[str, str]) -> str:
    script = script.replace("localhost:50051", grpc).replace("localhost:9090", metrics)
    full_env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir,
                          env=full_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


# ------------------------------------------------------------------ the tests


def test_every_block_runs_or_says_why_not(capsys: pytest.CaptureFixture[str]) -> None:
    """Each block is runnable, an output block, or marked skip with a reason."""
    assert len(BLOCKS) > 10, "the docs' code blocks were not found"
    problems, skipped = [], []
    for b in BLOCKS:
        if b.marker == "skip":
            skipped.append(f"{b.name} ({b.lang or 'untagged'}): {b.reason}")
            if not b.reason:
                problems.append(f"{b.name}: a skip marker needs a reason")
        elif b.marker == "output":
            prev = [p for p in BLOCKS if p.path == b.path and p.line < b.line]
            if not prev or prev[-1].lang not in PYTHON:
                problems.append(f"{b.name}: an output block must follow a python block")
        elif b.marker == "needs":
            if not b.reason or not any(n in b.reason for n in NEEDS):
                problems.append(f"{b.name}: doc-test: needs must name one of {NEEDS}")
        elif b.marker:
            problems.append(f"{b.name}: unknown marker doc-test: {b.marker}")
        elif b.lang not in PYTHON | SHELL | {"json"}:
            problems.append(f"{b.name}: a {b.lang or 'untagged'} block must be python, "
                            "sh, bash, console or json, or carry a doc-test marker")
    with capsys.disabled():
        print(f"\ndoc blocks: {len(BLOCKS)}, marked skip: {len(skipped)}")
        for line in skipped:
            print(f"  skip {line}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_doc_block(block: Block, request: pytest.FixtureRequest, workdir: Path,
                   api_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.marker == "skip":
        pytest.skip(f"marked in the doc: {block.reason}")
    if block.marker == "output":
        return  # compared by the python block before it
    if block.lang == "json":
        check_json(block)
        return
    if block.lang not in PYTHON | SHELL:
        pytest.fail(f"{block.name}: untagged or unknown block (see the first test)")
    needs = block.reason if block.marker == "needs" else ""
    env = {"APCM_API_KEY": api_key} if "APCM_API_KEY" in needs else {}
    monkeypatch.delenv("APCM_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if block.lang in PYTHON:
        if "the mTLS server" in needs:
            tls, workdir = request.getfixturevalue("tls_server")
            address = f"localhost:{tls.port}"
        else:
            text: ApcmServer = request.getfixturevalue(
                "keyed_server" if env else "text_server")
            address = f"127.0.0.1:{text.port}"
        expected = output_of(block)
        for attempt in ("first run", "second run"):
            printed = run_python(block, address, workdir)
            if expected is None:
                assert not printed, (f"{block.name} prints, but the doc does not show what: "
                                     f"add a text block marked doc-test: output\n{printed}")
            else:
                assert outputs_match(printed, expected.code), (
                    f"{attempt} of {block.name} printed\n{printed}\nbut "
                    f"{expected.name} shows\n{expected.code}")
        return
    script = shell_script(block)
    tool = missing_tool(script)
    if tool:
        pytest.skip(f"{tool} is not installed")
    text = request.getfixturevalue("text_server")
    run_shell(script, f"127.0.0.1:{text.port}", f"127.0.0.1:{text.metrics_port}", workdir, env)


def check_json(block: Block) -> None:
    config = json.loads(block.code)
    for name, server in config.get("mcpServers", {}).items():
        # The MCP host starts this command; it must at least accept its arguments.
        cmd = [server["command"], *server["args"], "--help"]
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"MCP server {name!r}: {cmd} failed\n{done.stderr}"
