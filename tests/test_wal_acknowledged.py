"""Damage to the end of the write-ahead log, through a REAL ``apcm serve`` process.

A record the log made durable (and so may have acknowledged) is never cut off as a
"torn final write": a flipped bit in the last record's body, or acknowledged
records zeroed at the end of the file, stop start-up with a message naming the
segment, the byte and the sequences; ``--allow-empty-start`` accepts the loss and
names the lost sequences. Bytes past what the log acknowledged are still a torn
write and are cut away.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_crash_recovery import ServerProcess

from apcm.client import MemoryClient
from apcm.server.persistence.wal import encode_record, iter_segment, list_segments

BANK = "acked"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for s in started:
        s.kill9()


def _server(servers: list[ServerProcess], model: Path, data_dir: Path,
            **flags: object) -> ServerProcess:
    proc = ServerProcess(model, data_dir, data_dir.parent / f"server-{len(servers)}.log",
                         **{"snapshot-interval-s": 0, **flags})
    servers.append(proc)
    return proc


def _write_then_kill9(servers: list[ServerProcess], model: Path, data_dir: Path,
                      n: int) -> tuple[Path, list[tuple[int, int, int]]]:
    """``n`` acknowledged one-item writes, then SIGKILL. Returns the newest segment and
    its records as (offset, end, sequence)."""
    proc = _server(servers, model, data_dir)
    port = proc.wait_serving()
    rng = np.random.default_rng(0)
    with MemoryClient(f"127.0.0.1:{port}", timeout=10.0) as client:
        client.create_bank(BANK, 64)
        for i in range(n):
            client.write(codes=rng.standard_normal((1, 8)).astype(np.float32), bank=BANK,
                         mode="per_item", keys=[f"k{i}"], payloads=[b"p" * i])
    proc.kill9()
    _, segment = list_segments(data_dir / "wal")[-1]
    ends = [(end, r.seq) for end, r in iter_segment(segment)]
    data = segment.read_bytes()
    first = 16 + int.from_bytes(data[12:16], "little") + 4
    starts = [first] + [e for e, _ in ends[:-1]]
    return segment, [(s, e, q) for s, (e, q) in zip(starts, ends, strict=True)]


def _exit_code(proc: ServerProcess) -> int:
    """The exit code of a server expected to refuse to start (fails if it serves)."""
    deadline = time.monotonic() + 60
    while (code := proc.proc.poll()) is None and time.monotonic() < deadline:
        if "apcm: serving gRPC" in proc.output():
            raise AssertionError(f"server started instead of refusing:\n{proc.output()}")
        time.sleep(0.05)
    assert code is not None, proc.output()
    return code


def _keys(port: int) -> int:
    with MemoryClient(f"127.0.0.1:{port}", timeout=10.0) as client:
        return client.describe_bank(BANK).occupied


def test_flipped_bit_in_the_last_records_body_stops_start_up(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    segment, records = _write_then_kill9(servers, model_path, data_dir, 10)
    start, end, seq = records[-1]
    data = bytearray(segment.read_bytes())
    assert end == len(data)
    data[start + 12 + 20] ^= 0x04  # inside the body: length and header CRC intact
    segment.write_bytes(bytes(data))

    refused = _server(servers, model_path, data_dir)
    assert _exit_code(refused) == 2
    out = refused.output()
    assert f"{segment.name} is damaged at byte {start}" in out, out
    assert f"acknowledged sequence {seq} is lost" in out, out
    assert "never acknowledged" not in out
    assert segment.stat().st_size == len(data)  # nothing was cut off

    accepted = _server(servers, model_path, data_dir, **{"allow-empty-start": True})
    port = accepted.wait_serving()
    assert f"LOSING acknowledged sequence {seq}" in accepted.output()
    assert _keys(port) == 9


def test_zeroed_acknowledged_tail_names_the_records_it_lost(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    segment, records = _write_then_kill9(servers, model_path, data_dir, 10)
    start = records[-8][0]  # the last 8 acknowledged writes
    first_lost, last_lost = records[-8][2], records[-1][2]
    data = bytearray(segment.read_bytes())
    data[start + 5:] = bytes(len(data) - start - 5)
    segment.write_bytes(bytes(data))

    refused = _server(servers, model_path, data_dir)
    assert _exit_code(refused) == 2
    out = refused.output()
    assert f"{segment.name} is damaged at byte {start}" in out, out
    assert (f"8 records (acknowledged sequences {first_lost}..{last_lost}) are lost"
            in out), out
    assert "partial record" not in out


def test_bytes_past_the_acknowledged_end_are_a_torn_write(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    segment, records = _write_then_kill9(servers, model_path, data_dir, 3)
    size = segment.stat().st_size
    # A record the crash interrupted: full length (even its body CRC fails) but past
    # what the log had made durable, so never acknowledged.
    record = bytearray(encode_record(records[-1][2] + 1, "clear", BANK, {"pad": "x" * 64}))
    record[-3] ^= 0xFF
    with open(segment, "ab") as f:
        f.write(bytes(record))

    proc = _server(servers, model_path, data_dir)
    port = proc.wait_serving()
    out = proc.output()
    assert re.search(rf"torn final write at byte {size} .* never acknowledged", out), out
    assert _keys(port) == 3
