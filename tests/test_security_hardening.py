"""Issue 13 item 8: API keys kept out of ``ps`` and a bounded rejection log."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from apcm.client import MemoryClient, UnauthenticatedError


def test_rejections_are_logged_at_most_once_per_interval(make_server, caplog) -> None:
    srv = make_server(api_keys="secret-key")
    with caplog.at_level(logging.INFO, logger="apcm.server.api.auth"), \
            MemoryClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(20):
            with pytest.raises(UnauthenticatedError):
                c.list_banks()
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "secret-key" not in " ".join(lines)


def test_help_says_to_prefer_the_keys_file_or_env_over_the_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "apcm.server.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    assert "visible in ps" in text and "APCM_API_KEYS" in text and "--api-keys-file" in text
