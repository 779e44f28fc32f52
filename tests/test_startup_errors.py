"""Start-up and configuration errors of ``apcm serve``, run as a real process: each
names its real cause, exits with status 2 without a traceback, and comes before the
model and embedder load; plus the plaintext-keys warning of a real server."""

from __future__ import annotations

import logging
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TEXT_MODEL
from test_security import RW_KEY, Pki, pki  # noqa: F401 (pki: the certificate fixture)

from apcm.server.api.app import ApcmServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def _serve(*flags: str, fsize_limit: int = 0, stop_when_serving: bool = False,
           ) -> tuple[int, str]:
    """Runs ``apcm serve`` with ``flags``; returns (exit status, output)."""

    def limit_file_size() -> None:  # a real kernel refusal standing in for a full disk
        if fsize_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    cmd = [sys.executable, "-m", "apcm.server.cli", "serve", "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "-1", "--device", "cpu", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=limit_file_size)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if stop_when_serving and "apcm: serving gRPC" in line:
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120), "".join(out)


def test_tls_cert_without_key_is_a_clean_error(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    code, out = _serve("--tls-cert", str(pki.server_cert), "--data-dir", str(tmp_path))
    assert code == 2, out
    assert "Traceback" not in out, out
    assert "apcm serve: error: --tls-cert needs --tls-key (TLS takes both)" in out, out


def test_mismatched_tls_key_names_the_real_cause_before_the_model_loads(
    pki: Pki, tmp_path: Path  # noqa: F811
) -> None:
    code, out = _serve("--model", str(TEXT_MODEL), "--data-dir", str(tmp_path),
                       "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    assert code == 2, out
    assert (f"tls_key {pki.client_key} is not the private key of the certificate "
            f"{pki.server_cert}") in out, out
    assert "port" not in out and "in use" not in out, out
    assert "text embedder:" not in out, out  # refused before the model and embedder loaded


def test_restart_on_a_full_disk_names_the_path(model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out = _serve("--model", str(model_path), "--data-dir", str(data),
                       stop_when_serving=True)
    assert code == 0, out
    code, out = _serve("--model", str(model_path), "--data-dir", str(data), fsize_limit=100)
    assert code == 2, out
    assert "Traceback" not in out, out
    assert f"cannot start: {data / 'wal'}" in out and "File too large" in out, out


def test_api_keys_over_plaintext_beyond_loopback_are_warned_about(
    make_server: Callable[..., ApcmServer], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="apcm"):
        make_server(host="0.0.0.0", api_keys=RW_KEY)
    assert ("API keys are configured but 0.0.0.0 serves plaintext: every key crosses the "
            "network readable") in caplog.text
    assert RW_KEY not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apcm"):
        make_server(host="127.0.0.1", api_keys=RW_KEY)
    assert "serves plaintext" not in caplog.text


def test_a_port_in_use_is_named_as_such(model_path: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _serve("--model", str(model_path), "--data-dir", str(tmp_path),
                           "--grpc-port", str(port))
    assert code == 2, out
    assert f"cannot bind gRPC to 127.0.0.1:{port}: Address already in use" in out, out
