"""The ``apcm`` command line as a user runs it: a subprocess serving real gRPC."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from float_bounds import assert_within_bound, pca_decode_bound, pca_encode_bound

from apcm.client import MemoryClient
from apcm.server.config import Settings, env_name

APCM = [sys.executable, "-m", "apcm.server.cli"]


def test_serve_help_documents_every_flag_and_its_env_var() -> None:
    out = subprocess.run([*APCM, "serve", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert env_name(f.name) in text, f.name
    assert "--port" in text and "APCM_GRPC_PORT" in text


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([*APCM, "serve", *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"serving gRPC on \S+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: exit {proc.poll()}")


def test_cli_server_round_trip_and_clean_sigterm(model_path: Path, tmp_path: Path, codec,
                                                 digits) -> None:
    env = {**os.environ, "APCM_METRICS_PORT": "-1", "APCM_DATA_DIR": str(tmp_path)}
    proc, port = _start(["--model", str(model_path), "--host", "127.0.0.1", "--port", "0"], env)
    try:
        with MemoryClient(f"127.0.0.1:{port}", timeout=20) as client:
            assert client.health() == "SERVING"
            x = digits[1600:1610]
            recon = client.decompress(client.compress(x))
        # another process, maybe another thread count: the exact PCA round trip, with
        # the encode's float32 error carried through the decode
        assert_within_bound(recon.reshape(len(x), -1),
                            *pca_decode_bound(codec, *pca_encode_bound(codec, x)), "round trip")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_refuses_a_missing_model_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "APCM_METRICS_PORT": "-1", "APCM_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [*APCM, "serve", "--model", str(tmp_path / "nope.safetensors"), "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "does not exist" in out.stderr


def _taken_port() -> tuple[object, int]:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_taken_ports_give_one_line_naming_the_port_and_the_flag(model_path: Path,
                                                                 tmp_path: Path) -> None:
    sock, port = _taken_port()
    try:
        for args, env_extra, flag, env_var in (
            (["--port", str(port), "--metrics-port", "-1"], {}, "--port", "APCM_GRPC_PORT"),
            (["--port", "0", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"], {},
             "--metrics-port", "APCM_METRICS_PORT"),
        ):
            env = {**os.environ, "APCM_DATA_DIR": str(tmp_path), **env_extra}
            out = subprocess.run(
                [*APCM, "serve", "--model", str(model_path), "--host", "127.0.0.1", *args],
                env=env, capture_output=True, text=True, timeout=60,
            )
            assert out.returncode == 2, out.stderr[-2000:]
            assert "Traceback" not in out.stderr, out.stderr[-2000:]
            errors = [line for line in out.stderr.splitlines() if "cannot start" in line]
            assert len(errors) == 1, out.stderr[-2000:]
            assert str(port) in errors[0] and flag in errors[0] and env_var in errors[0]
    finally:
        sock.close()  # type: ignore[attr-defined]


def test_mcp_without_the_agent_extra_says_how_to_get_it() -> None:
    """A serving install lacks the ``mcp`` package: one line naming the extra, exit 2."""
    hide_mcp = ("import sys; sys.modules['mcp'] = None; from apcm.server.cli import main; "
                "sys.exit(main(['mcp', '--target', '127.0.0.1:1']))")
    done = subprocess.run([sys.executable, "-c", hide_mcp], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "apcm mcp: the MCP server needs the agent extra, which this install lacks: run "
        "`pip install 'apcm[agent]'` (in a checkout: `make install`, or "
        "`.venv/bin/pip install -e '.[agent]'`)."]


def test_mcp_tool_bounds_are_the_servers() -> None:
    """The client cannot import the server, so its copies of the limits are pinned here."""
    from apcm.client import agent_memory as tools
    from apcm.server.domain.params import MAX_TOP_K
    from apcm.server.domain.recall import MAX_TEXT_CHARS
    from apcm.server.memory import metadata, names

    settings = Settings()
    assert tools.MAX_TEXT_CHARS == MAX_TEXT_CHARS
    assert tools.MAX_METADATA_ENTRIES == metadata.MAX_METADATA_ENTRIES
    assert tools.MAX_METADATA_KEY_CHARS == metadata.MAX_METADATA_KEY_CHARS
    assert tools.MAX_METADATA_VALUE_CHARS == metadata.MAX_METADATA_VALUE_CHARS
    assert settings.max_key_length == tools.MAX_KEY_CHARS
    assert settings.max_bank_capacity == tools.MAX_BANK_CAPACITY
    assert settings.default_bank_capacity == tools.DEFAULT_BANK_CAPACITY
    assert tools.MAX_TOP_K <= MAX_TOP_K
    assert str(names.MAX_NAME_LENGTH - 1) in tools.BANK_NAME_PATTERN


STAGES = ("loaded the server code", "loaded the codec", "loaded the text embedder",
          "recovered the banks", "warm-up round trip", "SERVING")


def test_serve_logs_each_start_up_stage_and_no_library_chatter(tmp_path: Path) -> None:
    """One line per stage with its duration; bm25s' DEBUG lines, sentence-transformers'
    INFO lines and transformers' weight-loading bar stay out of the log."""
    env = {**os.environ, "APCM_METRICS_PORT": "-1", "APCM_DATA_DIR": str(tmp_path)}
    model = Path(__file__).resolve().parents[1] / "model_weights" / "text-minilm.safetensors"
    proc = subprocess.Popen([*APCM, "serve", "--model", str(model), "--host", "127.0.0.1",
                             "--port", "0", "--browser-port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        while not any("serving gRPC on" in line for line in lines):
            lines.append(proc.stderr.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        port = int(re.search(r"serving gRPC on \S+:(\d+)",  # type: ignore[union-attr]
                             lines[-1]).group(1))
        with MemoryClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.remember(["Alice is allergic to peanuts."], keys=["a"])  # builds BM25
            assert client.recall("what is Alice allergic to?")[0].key == "a"
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    timed = [line for line in lines if " INFO apcm: start-up: " in line]
    assert [next(s for s in STAGES if f"start-up: {s}" in line) for line in timed] == \
        list(STAGES), log
    assert all(re.search(r"\(\d+\.\d\d s\)$|\d+\.\d\d s after", line.strip())
               for line in timed), log
    for noise in ("bm25s", "DEBUG", "sentence_transformers", "Loading weights", "it/s]"):
        assert noise not in log, log


def test_bad_settings_fail_before_the_server_imports_torch() -> None:
    check = ("import sys; from apcm.server.cli import main; code = main(['serve', "
             "'--max-batch-size', '0']); print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip() == "apcm serve: error: max_batch_size must be >= 1, got 0"
