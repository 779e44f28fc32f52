"""Crash safety of a REAL server process: every acknowledged write survives ``kill -9``.

Each test runs ``apcm serve`` as a subprocess on a free port, drives it through the
real client, kills it with SIGKILL, damages files the way a crash or a bad disk
would, restarts it and checks every acknowledged memory — codes bit for bit, key
and payload — in a snapshot file written by the restarted server. The snapshot
RPCs (create, list, restore under concurrent writes, refusals) are exercised
through the real client against a real in-process server.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from apcm.client import MemoryClient
from apcm.client.errors import (
    AlreadyExistsError,
    ApcmError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from apcm.server.codecs.base import load_codec
from apcm.server.config import Settings
from apcm.server.memory.store import MemoryStore
from apcm.server.persistence.manager import PersistenceManager
from apcm.server.persistence.wal import encode_record, list_segments

BANK = "crash"
START_TIMEOUT_S = 60.0
pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class Acked:
    """A write the server acknowledged."""

    key: str
    slot: int
    code: np.ndarray
    payload: bytes


class ServerProcess:
    """``apcm serve`` in a subprocess; its output goes to a log file we can search."""

    def __init__(self, model: Path, data_dir: Path, log_path: Path, **flags: object) -> None:
        self.log_path = log_path
        args = {
            "model": model, "data-dir": data_dir, "host": "127.0.0.1", "grpc-port": 0,
            "metrics-port": -1, "device": "cpu", "snapshot-interval-s": 0.5,
            "snapshot-keep": 20, "default-bank-capacity": 16, "shutdown-grace-s": 0.5,
        }
        args.update(flags)
        cmd = [sys.executable, "-m", "apcm.server.cli", "serve"]
        for k, v in args.items():
            cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]  # True: a bare switch
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in kill())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = 0

    def wait_serving(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = re.search(r"apcm: serving gRPC on \S+:(\d+)", self.output())
            if m:
                self.port = int(m.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.output()}")

    def wait_exit(self) -> int:
        code = self.proc.wait(timeout=START_TIMEOUT_S)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for s in started:
        s.kill9()


def _start(servers: list[ServerProcess], model: Path, data_dir: Path, **flags: object) -> int:
    log_path = data_dir.parent / f"server-{len(servers)}.log"
    proc = ServerProcess(model, data_dir, log_path, **flags)
    servers.append(proc)
    return proc.wait_serving()


def _write_until_killed(
    port: int, proc: ServerProcess, rng: random.Random, tag: str, snapshots: int
) -> list[Acked]:
    """Four writers hammer the server; it is SIGKILLed at a random moment."""
    acked: list[Acked] = []
    lock = threading.Lock()

    def writer(tid: int) -> None:
        gen = np.random.default_rng(rng.randrange(1 << 30))
        with MemoryClient(f"127.0.0.1:{port}", timeout=10.0, retries=0) as client:
            for i in range(100_000):
                code = gen.standard_normal((1, 8)).astype(np.float32)
                payload = gen.bytes(int(gen.integers(0, 40)))
                key = f"{tag}-t{tid}-{i}"
                try:
                    (w,) = client.write(codes=code, bank=BANK, mode="per_item",
                                        keys=[key], payloads=[payload])
                except ApcmError:
                    return  # the server died; this write was never acknowledged
                with lock:
                    acked.append(Acked(key, w.slot, code[0], payload))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    with MemoryClient(f"127.0.0.1:{port}", timeout=10.0, retries=0) as admin:
        for i in range(snapshots):  # on-demand snapshots while writes are in flight
            time.sleep(0.2)
            admin.create_snapshot(f"{tag}-s{i}")
    time.sleep(rng.uniform(0.3, 1.0))
    proc.kill9()
    for t in threads:
        t.join()
    return acked


def _snapshot_arrays(path: Path, bank: str = BANK) -> dict[str, np.ndarray]:
    """The bank's arrays, read with plain safetensors (independent of our reader), with
    those of the bank file the snapshot names for it, if any."""
    with safe_open(str(path), framework="np") as f:
        arrays = {k.split("/")[-1]: f.get_tensor(k) for k in f.keys()  # noqa: SIM118
                  if k.startswith(f"bank/{bank}/")}
        digest = json.loads(f.metadata().get("bank_files", "{}")).get(bank)
    if digest is not None:
        shared = path.parent / "banks" / f"{digest.removeprefix('sha256:')}.safetensors"
        with safe_open(str(shared), framework="np") as f:
            arrays.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return arrays


def _named_bank_files(data_dir: Path) -> dict[str, set[str]]:
    """Per bank, the digests of the bank files the snapshots on disk name."""
    named: dict[str, set[str]] = {}
    for p in (data_dir / "snapshots").glob("*.safetensors"):
        with safe_open(str(p), framework="np") as f:
            for bank, digest in json.loads(f.metadata().get("bank_files", "{}")).items():
                named.setdefault(bank, set()).add(digest)
    return named


def _verify_all_present(port: int, data_dir: Path, acked: list[Acked], tag: str) -> None:
    with MemoryClient(f"127.0.0.1:{port}", timeout=30.0, retries=0) as client:
        info = client.create_snapshot(f"verify-{tag}")
        sample = acked[:: max(1, len(acked) // 20)]
        for a in sample:  # the API view agrees with the file view
            (result,) = client.read(codes=a.code[None], bank=BANK, top_k=1, payloads=True,
                                    count_access=False)
            assert result.hits[0].key == a.key and result.hits[0].payload == a.payload
    arrays = _snapshot_arrays(data_dir / "snapshots" / f"{info.name}.safetensors")
    koff, poff = arrays["key_offsets"], arrays["payload_offsets"]
    missing = []
    for a in acked:
        s = a.slot
        key = arrays["key_data"][koff[s]:koff[s + 1]].tobytes().decode()
        payload = arrays["payload_data"][poff[s]:poff[s + 1]].tobytes()
        if not (arrays["occupied"][s] and key == a.key and payload == a.payload
                and arrays["codes"][s].tobytes() == a.code.tobytes()):
            missing.append(a.key)
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def _newest_snapshot(data_dir: Path) -> Path:
    def created(p: Path) -> float:
        with safe_open(str(p), framework="np") as f:
            return float(f.metadata()["created_at"])

    return max((data_dir / "snapshots").glob("*.safetensors"), key=created)


def test_acknowledged_writes_survive_kill9_rounds(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    seed = int(os.environ.get("APCM_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    acked: list[Acked] = []
    for rnd in range(3):
        port = _start(servers, model_path, data_dir)
        if acked:
            _verify_all_present(port, data_dir, acked, f"r{rnd}")
        with MemoryClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            client.create_bank(BANK, 20_000, exist_ok=True)
        new = _write_until_killed(port, servers[-1], rng, f"r{rnd}", snapshots=2)
        assert len(new) > 20, f"seed {seed}: too few writes acknowledged to test anything"
        acked += new
        if rnd == 0:
            # A bad disk write in the newest snapshot: recovery must skip it, loudly.
            damaged = _newest_snapshot(data_dir)
            data = bytearray(damaged.read_bytes())
            data[len(data) // 2] ^= 0x5A
            damaged.write_bytes(bytes(data))
        if rnd == 1:
            # A torn final log write: the first bytes of a real record (its header and
            # the start of its body) made it to the file, the rest did not.
            _, segment = list_segments(data_dir / "wal")[-1]
            record = encode_record(10**9, "clear", BANK, {"padding": "x" * 64})
            with open(segment, "ab") as f:
                f.write(record[:19])
    port = _start(servers, model_path, data_dir)
    _verify_all_present(port, data_dir, acked, "final")
    assert f"SKIPPING damaged snapshot {damaged.name[:-len('.safetensors')]}" in (
        servers[1].output())
    assert "torn final write" in servers[2].output()
    with MemoryClient(f"127.0.0.1:{port}", timeout=30.0) as client:
        listed = {s.name: s.valid for s in client.list_snapshots()}
    assert listed[damaged.name[: -len(".safetensors")]] is False


def test_kill9_while_snapshots_share_bank_files_loses_nothing(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """Every bank in a bank file, snapshots every 0.2 s while writers change one bank
    and readers only the counters of another; SIGKILL at random moments."""
    seed = int(os.environ.get("APCM_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    flags = {"snapshot-bank-file-bytes": 1, "snapshot-interval-s": 0.2, "snapshot-keep": 3}
    still = np.random.default_rng(seed).standard_normal((40, 8)).astype(np.float32)
    acked: list[Acked] = []
    for rnd in range(3):
        port = _start(servers, model_path, data_dir, **flags)
        if acked:
            _verify_all_present(port, data_dir, acked, f"r{rnd}")
        with MemoryClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            client.create_bank(BANK, 20_000, exist_ok=True)
            if rnd == 0:
                client.create_bank("still", 100)
                client.write(codes=still, bank="still", mode="per_item")
        stop = threading.Event()

        def reader(port: int = port, stop: threading.Event = stop) -> None:
            with MemoryClient(f"127.0.0.1:{port}", timeout=10.0, retries=0) as client:
                while not stop.is_set():
                    try:
                        client.read(codes=still[:4], bank="still", top_k=1)
                    except ApcmError:
                        return  # killed
        thread = threading.Thread(target=reader)
        thread.start()
        new = _write_until_killed(port, servers[-1], rng, f"r{rnd}", snapshots=2)
        stop.set()
        thread.join()
        assert len(new) > 20, f"seed {seed}: too few writes acknowledged to test anything"
        acked += new
    port = _start(servers, model_path, data_dir, **flags)
    _verify_all_present(port, data_dir, acked, "final")
    with MemoryClient(f"127.0.0.1:{port}", timeout=30.0) as client:
        assert all(s.valid for s in client.list_snapshots()), f"seed {seed}"
        assert client.describe_bank("still").occupied == len(still)
    servers[-1].kill9()
    named = _named_bank_files(data_dir)
    assert len(named["still"]) == 1, f"seed {seed}: the unchanged bank was written again"
    newest = _newest_snapshot(data_dir)
    np.testing.assert_array_equal(_snapshot_arrays(newest, "still")["codes"], still)
    on_disk = {p.name for p in (data_dir / "snapshots" / "banks").iterdir()
               if not p.name.startswith(".")}
    # every bank file a snapshot names is there (kill -9 between writes included)
    assert {d.removeprefix("sha256:") + ".safetensors" for s in named.values()
            for d in s} <= on_disk


def _write_offline(data_dir: Path, model: Path, snapshot: bool) -> str:
    """Produce a data dir through the real store and manager, as a server would."""
    codec = load_codec(model)
    store = MemoryStore(code_dim=codec.code_dim, code_dtype=codec.code_dtype,
                        scale=codec.quantizer.scale, device=torch.device("cpu"),
                        max_capacity=1000, max_payload_bytes=100, max_key_length=64,
                        default_policy="lfu", default_half_life=10.0)
    settings = Settings(data_dir=str(data_dir), snapshot_interval_s=0.0)
    mgr = PersistenceManager(store, settings, codec.content_hash, codec.kind)
    mgr.recover()
    mgr.start()
    store.create_bank(BANK, 100)
    for i in range(20):
        codes = codec.quantizer.quantize(torch.randn(1, codec.code_dim))
        store.write(BANK, codes, [f"k{i}"], [b"p"])
    if snapshot:
        mgr.snapshot("offline")
    mgr.close(final_snapshot=False)
    return codec.content_hash


def test_corrupt_record_in_the_middle_of_the_log_refuses_to_start(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    _write_offline(data_dir, model_path, snapshot=False)
    _, segment = list_segments(data_dir / "wal")[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF  # records follow the damaged one
    segment.write_bytes(bytes(data))
    proc = ServerProcess(model_path, data_dir, tmp_path / "server.log")
    servers.append(proc)
    assert proc.wait_exit() == 2
    out = proc.output()
    assert "cannot start" in out and "is corrupt at byte" in out and segment.name in out
    assert segment.stat().st_size == len(data)  # evidence is left untouched


def test_snapshot_of_another_model_refuses_to_start_naming_its_hash(
    model_path: Path, int8_model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    needed = _write_offline(data_dir, model_path, snapshot=True)
    proc = ServerProcess(int8_model_path, data_dir, tmp_path / "server.log")
    servers.append(proc)
    assert proc.wait_exit() == 2
    out = proc.output()
    assert "cannot start" in out and f"needs model {needed}" in out


# ------------------------------------------------ snapshot RPCs through the real client


def _snapshot_file(server: Any, name: str) -> Path:
    return Path(server.settings.data_dir) / "snapshots" / f"{name}.safetensors"


def test_snapshot_rpcs_create_list_and_validate_names(make_server: Any, codec: Any) -> None:
    server = make_server()
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=30.0) as client:
        client.create_bank(BANK, 100)
        client.write(codes=np.ones((3, codec.code_dim), np.float32), bank=BANK,
                     mode="per_item", keys=["a", "b", "c"])
        info = client.create_snapshot("first")
        assert info.name == "first" and info.valid
        assert info.model_hash == codec.content_hash
        assert info.wal_sequence == server.service.store.last_seq
        assert set(info.banks) == {BANK, server.settings.default_bank}
        assert info.size_bytes == _snapshot_file(server, "first").stat().st_size
        auto = client.create_snapshot()
        assert auto.name.startswith("snap-") and auto.name != "first"
        assert [s.name for s in client.list_snapshots()][:2] == [auto.name, "first"]
        for bad in ("../escape", "a/b", "..", ".hidden", "x" * 65):
            with pytest.raises(InvalidArgumentError):
                client.create_snapshot(bad)
            with pytest.raises(InvalidArgumentError):
                client.restore_snapshot(bad)
        with pytest.raises(AlreadyExistsError):
            client.create_snapshot("first")
        with pytest.raises(NotFoundError):
            client.restore_snapshot("never-made")
    assert not (Path(server.settings.data_dir).parent / "escape.safetensors").exists()


def _health_watch(port: int) -> tuple[list[str], Any]:
    """Statuses the standard Health/Watch stream delivers, collected in the background."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    seen: list[str] = []

    def collect() -> None:
        try:
            for response in stream:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            pass

    threading.Thread(target=collect, daemon=True).start()

    def stop() -> None:
        stream.cancel()
        channel.close()

    return seen, stop


def test_restore_under_concurrent_writes_equals_the_snapshot_state(
    make_server: Any, codec: Any
) -> None:
    """Writers keep writing through the restore: writes refused meanwhile (not
    serving) are not acknowledged, and the state afterwards is the snapshot plus
    exactly the writes acknowledged after the swap."""
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    with MemoryClient(address, timeout=30.0) as client:
        client.create_bank(BANK, 20_000)
    acked: list[tuple[int, int, bytes, float]] = []  # (sequence, slot, code, sent at)
    refused = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def writer(tid: int) -> None:
        gen = np.random.default_rng(tid)
        with MemoryClient(address, timeout=30.0, retries=0) as c:
            i = 0
            while not stop.is_set() and i < 20_000:
                code = gen.standard_normal((1, codec.code_dim)).astype(np.float32)
                sent = time.monotonic()
                try:
                    (w,) = c.write(codes=code, bank=BANK, mode="per_item",
                                   keys=[f"{tid}-{i}"])
                except FailedPreconditionError:  # not serving: the restore is running
                    with lock:
                        refused[0] += 1
                else:
                    with lock:
                        acked.append((w.sequence, w.slot, code.tobytes(), sent))
                i += 1

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(acked) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= n, "writers stalled"

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    wait_for(100)
    with MemoryClient(address, timeout=30.0) as client:
        mid = client.create_snapshot("mid")
        wait_for(len(acked) + 100)
        seen, stop_watch = _health_watch(server.port)
        time.sleep(0.2)
        result = client.restore_snapshot("mid")  # the writers are still running
        restored_at = time.monotonic()
        wait_for(len(acked) + 100)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        stop_watch()
        assert result.snapshot.name == "mid"
        assert client.health() == "SERVING"
        after = client.create_snapshot("after-restore")
    assert "NOT_SERVING" in seen and seen[-1] == "SERVING"
    assert after.wal_sequence >= max(a[0] for a in acked)  # sequences never go back
    arrays = _snapshot_arrays(_snapshot_file(server, "after-restore"))

    def present(seq: int, slot: int, code: bytes) -> bool:
        if slot >= len(arrays["occupied"]):  # exports end at the last occupied slot
            return False
        return bool(arrays["occupied"][slot]) and int(arrays["sequences"][slot]) == seq \
            and arrays["codes"][slot].tobytes() == code

    before = [a for a in acked if a[0] <= mid.wal_sequence]
    lost_window = [a for a in acked if a[0] > mid.wal_sequence and a[3] < restored_at]
    later = [a for a in acked if a[3] > restored_at]
    assert before and lost_window and later, "writes must be in flight around the restore"
    assert all(present(seq, slot, code) for seq, slot, code, _ in before)
    assert all(present(seq, slot, code) for seq, slot, code, _ in later)
    # writes acknowledged between the snapshot and the swap are replaced by the restore
    pre_swap = [a for a in lost_window if not present(*a[:3])]
    assert pre_swap, "no write landed between the snapshot and the swap"
    occupied = int(arrays["occupied"].sum())
    assert occupied == len(before) + sum(present(*a[:3]) for a in acked if a not in before)


def test_restore_refuses_damaged_and_foreign_snapshots(
    make_server: Any, int8_model_path: Path, codec: Any, tmp_path: Path
) -> None:
    server = make_server()
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=30.0) as client:
        client.create_bank(BANK, 100)
        client.write(codes=np.ones((2, codec.code_dim), np.float32), bank=BANK,
                     mode="per_item", keys=["a", "b"])
        client.create_snapshot("good")
        damaged = _snapshot_file(server, "good").read_bytes()
        _snapshot_file(server, "bad").write_bytes(damaged[:-7])
        foreign_hash = _write_offline(tmp_path / "other", int8_model_path, snapshot=True)
        _snapshot_file(server, "foreign").write_bytes(
            (tmp_path / "other" / "snapshots" / "offline.safetensors").read_bytes())
        with pytest.raises(FailedPreconditionError, match="unreadable or truncated"):
            client.restore_snapshot("bad")
        with pytest.raises(FailedPreconditionError) as exc:
            client.restore_snapshot("foreign")
        assert f"needs model {foreign_hash}" in str(exc.value)
        listed = {s.name: s.valid for s in client.list_snapshots()}
        assert listed["good"] and not listed["bad"] and listed["foreign"]
        assert client.health() == "SERVING"
        assert client.describe_bank(BANK).occupied == 2  # nothing was replaced


def test_sigterm_writes_a_final_snapshot_holding_every_write(
    model_path: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    port = _start(servers, model_path, data_dir, **{"snapshot-interval-s": 0})
    with MemoryClient(f"127.0.0.1:{port}", timeout=30.0) as client:
        client.create_bank(BANK, 100)
        written = client.write(codes=np.arange(16, dtype=np.float32).reshape(2, 8), bank=BANK,
                               mode="per_item", keys=["x", "y"], payloads=[b"1", b"2"])
    proc = servers[-1]
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    (final,) = (data_dir / "snapshots").glob("*.safetensors")
    with safe_open(str(final), framework="np") as f:
        assert int(f.metadata()["wal_sequence"]) == max(w.sequence for w in written)
    arrays = _snapshot_arrays(final)
    assert arrays["codes"][[w.slot for w in written]].tobytes() == (
        np.arange(16, dtype=np.float32).tobytes())


def test_items_a_bank_staged_for_its_own_codec_survive_kill_9(
        servers: list[ServerProcess], tmp_path: Path) -> None:
    """Staged items come back from the log's write records alone (merged on replay),
    and a fit after the restart codes the memories written before it."""
    from conftest import TEXT_MODEL
    from test_bank_codecs import _narrow

    data = tmp_path / "data"
    flags = {"bank-codec-threshold": 400, "embedder": "none", "snapshot-interval-s": 0}
    items = _narrow(500, 1, 2)
    port = _start(servers, TEXT_MODEL, data, **flags)
    with MemoryClient(f"127.0.0.1:{port}", timeout=60.0) as c:
        c.create_bank("b", 1000)
        c.write(codes=c.compress(items[:5]), bank="b", mode="per_item")  # codes: not staged
        for i in range(5, 305, 10):
            c.write(items[i:i + 10], bank="b", mode="per_item",
                    keys=[f"k{j}" for j in range(i, i + 10)])
    servers[-1].kill9()
    port = _start(servers, TEXT_MODEL, data, **flags)
    with MemoryClient(f"127.0.0.1:{port}", timeout=60.0) as c:
        codec = c.describe_bank("b").codec
        assert codec is not None and (codec.state, codec.staged) == ("staging", 300)
        c.write(items[305:455], bank="b", mode="per_item",
                keys=[f"k{j}" for j in range(305, 455)])
        deadline = time.monotonic() + 120
        while (codec := c.describe_bank("b").codec) is not None and codec.state != "own":
            assert time.monotonic() < deadline, codec
            time.sleep(0.1)
        hits = c.read(items[5:305:10], bank="b", top_k=1, count_access=False)
        assert [h.hits[0].key for h in hits] == [f"k{j}" for j in range(5, 305, 10)]
