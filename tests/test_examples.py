"""The runnable examples in examples/, run as a user runs them: as scripts, against
a real server, here across a server restart on the same data directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import start_text_server

ROOT = Path(__file__).resolve().parents[1]


def _run_example(port: int, user: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_loop.py"),
         "--target", f"127.0.0.1:{port}", "--user", user],
        capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def test_agent_loop_remembers_facts_across_runs_and_a_restart(tmp_path: Path) -> None:
    server = start_text_server(tmp_path)
    try:
        first = _run_example(server.port, "alice")
    finally:
        server.stop(grace=0.5)
    assert "run 1" in first and "remembered 4 facts" in first
    server = start_text_server(tmp_path)  # same data dir: a restarted server
    try:
        second = _run_example(server.port, "alice")
        other_user = _run_example(server.port, "bob")  # bob's memory is his own
    finally:
        server.stop(grace=0.5)
    answers = dict(line.split("\nA: ") for line in second.split("Q: ")[1:])
    assert "peanuts" in answers["What food allergy does the user have?"]
    assert "3rd of June" in answers["When is the birthday of the user's daughter?"]
    assert "trains" in answers["How does the user like to travel?"]
    assert "marine biologist" in answers["Where does the user work?"]
    assert "run 1: nothing remembered about bob" in other_user
