"""A cluster of real ``apcm serve`` processes on loopback, formed from a static peer list.

The servers get the settings a StatefulSet gives its pods (a peer list indexed by
ordinal, the shard id, during a resize the previous shard count); ports are
picked free first. Waits are bounded; nothing asserts on timing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from apcm.client import MemoryClient
from apcm.client.errors import NotFoundError, UnavailableError
from apcm.server.cluster.placement import owner_of
from apcm.server.cluster.rebalance import rebalance
from apcm.server.cluster.router import FORWARDED_HEADER
from apcm.server.cluster.transfer import assemble, chunks, decode_bank
from apcm.v1 import cluster_pb2, cluster_pb2_grpc, memory_pb2, memory_pb2_grpc

START_TIMEOUT_S = 120.0
LOCAL = ((FORWARDED_HEADER, "test"),)  # served by the shard it is sent to
pytestmark = pytest.mark.timeout(420)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Node:
    """One shard: ``apcm serve`` with the peer list, its own data dir and log."""

    def __init__(self, model: Path, root: Path, shard: int, ports: list[int],
                 previous: int = 0, shard_count: int = 0) -> None:
        self.shard, self.port = shard, ports[shard]
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = root / f"shard-{shard}"
        self.log_path = root / f"shard-{shard}.log"
        flags = {
            "model": model, "data-dir": self.data_dir, "host": "127.0.0.1",
            "grpc-port": self.port, "metrics-port": -1, "device": "cpu",
            "snapshot-interval-s": 0, "default-bank-capacity": 16, "shutdown-grace-s": 0.5,
            "peers": ",".join(f"127.0.0.1:{p}" for p in ports),
            "previous-shard-count": previous, "torch-threads": 1, "shard-count": shard_count,
        }
        cmd = [sys.executable, "-m", "apcm.server.cli", "serve"]
        for k, v in flags.items():
            cmd += [f"--{k}", str(v)]
        # the shard id comes from the host name's ordinal, as in a StatefulSet
        env = {**os.environ, "HOSTNAME": f"apcm-{shard}"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in kill9)
        self._start = self._log.tell()  # a restart appends to the same log
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self) -> Node:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if "apcm: serving gRPC on" in self.output()[self._start:]:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"shard {self.shard} exited:\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"shard {self.shard} did not start:\n{self.output()}")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def client(self, **kw: object) -> MemoryClient:
        return MemoryClient(self.address, timeout=30.0, **kw)  # type: ignore[arg-type]

    def stubs(self) -> tuple[grpc.Channel, memory_pb2_grpc.MemoryServiceStub,
                             cluster_pb2_grpc.ClusterServiceStub]:
        ch = grpc.insecure_channel(self.address)
        return ch, memory_pb2_grpc.MemoryServiceStub(ch), cluster_pb2_grpc.ClusterServiceStub(ch)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for n in started:
        n.kill9()


def start(nodes: list[Node], model: Path, root: Path, ports: list[int], shards: range,
          previous: int = 0, shard_count: int = 0) -> list[Node]:
    new = [Node(model, root, s, ports, previous, shard_count) for s in shards]
    nodes.extend(new)
    return [n.wait_serving() for n in new]


def bank_owned_by(shard: int, n: int, prefix: str) -> str:
    return next(f"{prefix}-{i}" for i in range(10_000) if owner_of(f"{prefix}-{i}", n) == shard)


def local_banks(node: Node) -> dict[str, memory_pb2.BankInfo]:
    ch, memory, _ = node.stubs()
    with ch:
        return {b.name: b for b in memory.ListBanks(memory_pb2.ListBanksRequest(), timeout=30,
                                                    metadata=LOCAL).banks}


def stored_keys(node: Node, bank: str) -> set[str]:
    """Every key the shard holds in ``bank``, from its own export of the bank."""
    ch, _, cluster = node.stubs()
    with ch:
        _, data = assemble(cluster.ExportBank(cluster_pb2.ExportBankRequest(name=bank),
                                              timeout=60))
    _, arrays = decode_bank(data)
    raw, off = arrays["key_data"].tobytes(), arrays["key_offsets"].tolist()
    return {raw[a:b].decode() for a, b in zip(off, off[1:], strict=False) if b > a}


def codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, 8)).astype(np.float32)


def test_three_shards_place_forward_fan_out_and_survive_a_killed_shard(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(3)
    n0, n1, n2 = start(nodes, model_path, tmp_path, ports, range(3))
    banks = {s: bank_owned_by(s, 3, "notes") for s in range(3)}
    rng = np.random.default_rng(0)
    with n0.client() as c0, n1.client() as c1:
        for name in banks.values():
            c0.create_bank(name, capacity=64)
        x = codes(rng, 5)
        keys = [f"k{i}" for i in range(5)]
        c0.write(codes=x, bank=banks[2], mode="per_item", keys=keys, payloads=[b"p"] * 5)
        hits = c1.read(codes=x, bank=banks[2], top_k=1, payloads=True)
        assert [r.hits[0].key for r in hits] == keys
        assert hits[0].hits[0].payload == b"p"
        # the bank lives on its owner only
        assert banks[2] in local_banks(n2)
        assert banks[2] not in local_banks(n0) and banks[2] not in local_banks(n1)
        # errors come back verbatim from the owner
        with pytest.raises(NotFoundError, match="does not exist"):
            c1.describe_bank(bank_owned_by(2, 3, "missing"))
        # fan-out: every bank once, the default bank on its owner only
        listed = [b.name for b in c1.list_banks()]
        assert listed == sorted({*banks.values(), "default"})
        assert [s for s in range(3) if "default" in local_banks(nodes[s])] == \
            [owner_of("default", 3)]
        snap = c0.create_snapshot("cluster-snap")
        assert set(banks.values()) <= set(snap.banks)
        assert [s.name for s in c1.list_snapshots() if s.valid] == ["cluster-snap"]
        ch, _, cluster = n1.stubs()
        with ch:
            info = cluster.GetClusterInfo(cluster_pb2.GetClusterInfoRequest(), timeout=10)
        assert (info.shard_id, info.shard_count) == (1, 3)
        assert list(info.peers) == [f"127.0.0.1:{p}" for p in ports]

        n2.kill9()
        with n0.client(retries=0) as c:
            down = re.escape(f"shard 2 (127.0.0.1:{ports[2]}) is unavailable")
            with pytest.raises(UnavailableError, match=down):
                c.read(codes=x[:1], bank=banks[2])
            with pytest.raises(UnavailableError, match="shard 2"):
                c.list_banks()
        # the other shards' banks are served as before, through either live node
        for name in (banks[0], banks[1]):
            c1.write(codes=x[:1], bank=name, keys=["after"], mode="per_item")
            assert c0.read(codes=x[:1], bank=name)[0].hits[0].key == "after"


def test_rebalance_3_to_4_under_concurrent_writes_loses_no_acknowledged_write(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(4)
    first = start(nodes, model_path, tmp_path, ports[:3], range(3))
    names = [f"bank-{i}" for i in range(12)]
    moving = [b for b in names if owner_of(b, 4) == 3]
    assert moving and len(moving) < len(names)
    rng = np.random.default_rng(1)
    acked: dict[str, set[str]] = {b: set() for b in names}
    with first[0].client() as c:
        for b in names:
            c.create_bank(b, capacity=4096)
            c.write(codes=codes(rng, 4), bank=b, mode="per_item",
                    keys=[f"{b}/pre{i}" for i in range(4)])
            acked[b] |= {f"{b}/pre{i}" for i in range(4)}
        c.write(codes=codes(rng, 1), keys=["in-default"])  # the default bank moves too
    # the StatefulSet grows: every pod restarts with 4 peers (kill -9: nothing graceful)
    for n in first:
        n.kill9()
    nodes.clear()
    grown = start(nodes, model_path, tmp_path, ports, range(4), previous=3)

    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        try:
            write_until_stopped(w)
        except BaseException as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)

    def write_until_stopped(w: int) -> None:
        local_rng = np.random.default_rng(100 + w)
        node = grown[w % 4]
        with node.client(retries=0) as c:
            i = 0
            while not stop.is_set():
                bank = names[(w + i) % len(names)]
                key = f"{bank}/w{w}-{i}"
                for _ in range(200):  # "bank is moving, retry": bounded
                    try:
                        c.write(codes=codes(local_rng, 1), bank=bank, mode="per_item",
                                keys=[key])
                        break
                    except UnavailableError:
                        time.sleep(0.02)
                else:
                    errors.append(AssertionError(f"{key}: unavailable for too long"))
                    return
                with lock:
                    acked[bank].add(key)
                i += 1

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # writes are flowing (and reach moved banks through old owners)
        report = rebalance(grown[1].address, say=lambda s: None)
        time.sleep(0.5)  # and keep flowing after the moves
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    moved = {b for b, _, _ in report.moved}
    assert set(moving) <= moved
    assert "default" in moved or owner_of("default", 4) == owner_of("default", 3)

    # every bank is on its owner only, and holds every acknowledged write
    held = [local_banks(n) for n in grown]
    for b in names:
        assert [s for s in range(4) if b in held[s]] == [owner_of(b, 4)], b
        assert acked[b] <= stored_keys(grown[owner_of(b, 4)], b), b
    with grown[2].client() as c:
        assert c.read(codes=codes(rng, 1), bank="default", top_k=5)[0].hits
        assert {b.name for b in c.list_banks()} == {*names, "default"}
    again = rebalance(grown[0].address, say=lambda s: None)
    assert not again.moved and not again.skipped


def test_a_move_that_fails_or_is_cut_short_keeps_the_bank(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(2)
    n0, n1 = start(nodes, model_path, tmp_path, ports, range(2))
    name = bank_owned_by(1, 2, "misplaced")
    rng = np.random.default_rng(2)
    ch0, memory0, cluster0 = n0.stubs()
    # a bank left on shard 0 (as after a resize): created and written there directly
    memory0.CreateBank(memory_pb2.CreateBankRequest(name=name, capacity=32), timeout=30,
                       metadata=LOCAL)
    with n0.client() as c:
        written = {f"m{i}" for i in range(3)}
        # forwarded to the owner, which has no such bank
        with pytest.raises(NotFoundError):
            c.write(codes=codes(rng, 3), bank=name, mode="per_item", keys=sorted(written))
    from apcm.wire.tensors import to_proto

    memory0.Write(memory_pb2.WriteRequest(
        bank=name, codes=to_proto(codes(rng, 3)), mode=memory_pb2.WRITE_MODE_PER_ITEM,
        keys=sorted(written)), timeout=30, metadata=LOCAL)

    # the owner is down: the move fails naming it, the bank stays and takes writes again
    n1.kill9()
    with pytest.raises(grpc.RpcError) as err:
        cluster0.MoveBank(cluster_pb2.MoveBankRequest(name=name), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"shard 1 (127.0.0.1:{ports[1]})" in (err.value.details() or "")
    memory0.Write(memory_pb2.WriteRequest(
        bank=name, codes=to_proto(codes(rng, 1)), mode=memory_pb2.WRITE_MODE_PER_ITEM,
        keys=["after-failed-move"]), timeout=30, metadata=LOCAL)
    written.add("after-failed-move")
    assert stored_keys(n0, name) == written

    # a torn import is refused and leaves nothing behind
    nodes.remove(n1)
    n1 = start(nodes, model_path, tmp_path, ports, range(1, 2))[0]
    _, data = assemble(cluster0.ExportBank(cluster_pb2.ExportBankRequest(name=name), timeout=30))
    ch1, _, cluster1 = n1.stubs()
    torn = [cluster_pb2.BankChunk(bank=name, data=data[:100], total_bytes=len(data))]
    with pytest.raises(grpc.RpcError) as err:
        cluster1.ImportBank(iter(torn), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name not in local_banks(n1)

    # the source died after the owner acknowledged the import, before dropping its copy:
    # the rerun keeps the owner's copy and drops the leftover
    cluster1.ImportBank(chunks(name, data), timeout=30)
    n1.kill9()  # the import is durable: it survives kill -9 of the new owner too
    nodes.remove(n1)
    n1 = start(nodes, model_path, tmp_path, ports, range(1, 2))[0]
    assert stored_keys(n1, name) == written
    report = rebalance(n0.address, say=lambda s: None)
    assert report.dropped_leftovers == [(name, 0)] and not report.moved
    assert name not in local_banks(n0)
    # shard 0's channel to the restarted owner reconnects within its backoff (<= 1 s)
    with n0.client(retries=20) as c:
        assert c.describe_bank(name).occupied == len(written)
    ch0.close()
    ch1.close()


def test_a_single_server_reports_one_shard_and_moves_nothing(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        cluster = cluster_pb2_grpc.ClusterServiceStub(ch)
        info = cluster.GetClusterInfo(cluster_pb2.GetClusterInfoRequest(), timeout=10)
        assert (info.shard_id, info.shard_count, list(info.peers)) == (0, 1, [])
        with pytest.raises(grpc.RpcError) as err:
            cluster.MoveBank(cluster_pb2.MoveBankRequest(name="default"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # a bank exported from one server imports into another with the same codec
        _, data = assemble(cluster.ExportBank(cluster_pb2.ExportBankRequest(name="default"),
                                              timeout=10))
    other = make_server()
    with grpc.insecure_channel(f"127.0.0.1:{other.port}") as ch:
        cluster = cluster_pb2_grpc.ClusterServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # it has a default bank of its own
            cluster.ImportBank(chunks("default", data), timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


class Writers:
    """Threads writing one keyed memory at a time to ``names`` through ``via`` (round
    robin), retrying "moving, retry" (bounded); ``acked`` gets every acknowledged key."""

    def __init__(self, via: list[Node], names: list[str], acked: dict[str, set[str]]) -> None:
        self.via, self.names, self.acked = via, names, acked
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                        for w in range(len(via))]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, w: int) -> None:
        try:
            rng = np.random.default_rng(200 + w)
            with self.via[w].client(retries=0) as c:
                i = 0
                while not self.stop.is_set():
                    bank = self.names[(w + i) % len(self.names)]
                    key = f"{bank}/v{w}-{i}"
                    for _ in range(200):
                        try:
                            c.write(codes=codes(rng, 1), bank=bank, mode="per_item", keys=[key])
                            break
                        except UnavailableError:
                            time.sleep(0.02)
                    else:
                        raise AssertionError(f"{key}: unavailable for too long")
                    with self.lock:
                        self.acked[bank].add(key)
                    i += 1
        except BaseException as e:  # noqa: BLE001 (the test asserts there are none)
            self.errors.append(e)


def test_shrinking_4_to_3_under_concurrent_writes_loses_no_acknowledged_write(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(4)
    first = start(nodes, model_path, tmp_path, ports, range(4))
    names = [f"bank-{i}" for i in range(12)]
    assert any(owner_of(b, 4) == 3 for b in names)
    rng = np.random.default_rng(3)
    acked: dict[str, set[str]] = {b: set() for b in names}
    with first[0].client() as c:
        for b in names:
            c.create_bank(b, capacity=4096)
            c.write(codes=codes(rng, 2), bank=b, mode="per_item", keys=[f"{b}/pre0", f"{b}/pre1"])
            acked[b] |= {f"{b}/pre0", f"{b}/pre1"}
    # step 1: every pod restarts owning 3 shards; pod 3 still runs and drains
    for n in first:
        n.kill9()
    nodes.clear()
    shrinking = start(nodes, model_path, tmp_path, ports, range(4), previous=4, shard_count=3)
    with shrinking[3].client() as c:  # routing still finds banks not moved yet
        assert {b.name for b in c.list_banks()} >= set(names)
    # the map check refuses a stale shard count, moving nothing
    from apcm.server.cluster.rebalance import MapMismatch

    with pytest.raises(MapMismatch):
        rebalance(shrinking[0].address, say=lambda s: None, shard_count=4)
    # step 2: rebalance under writes through the pods that stay
    with Writers(shrinking[:3], names, acked) as writers:
        time.sleep(0.5)
        report = rebalance(shrinking[0].address, say=lambda s: None, shard_count=3)
        time.sleep(0.5)
    assert not writers.errors, writers.errors
    assert {b for b, src, _ in report.moved if src == 3 and b in names} == \
        {b for b in names if owner_of(b, 4) == 3}
    assert local_banks(shrinking[3]) == {}  # pod 3 holds nothing: it may go
    # step 3: the StatefulSet scales down to 3 and the pods restart without the resize
    for n in shrinking:
        n.kill9()
    nodes.clear()
    final = start(nodes, model_path, tmp_path, ports[:3], range(3))
    held = [local_banks(n) for n in final]
    for b in names:
        assert [s for s in range(3) if b in held[s]] == [owner_of(b, 3)], b
        assert acked[b] <= stored_keys(final[owner_of(b, 3)], b), b


def _snapshot_files(node: Node) -> list[Path]:
    return sorted((node.data_dir / "snapshots").glob("*.safetensors"))


def test_an_imported_bank_is_in_the_log_and_survives_kill9_and_a_damaged_snapshot(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(2)
    n0, n1 = start(nodes, model_path, tmp_path, ports, range(2))
    name = bank_owned_by(1, 2, "moving")
    rng = np.random.default_rng(4)
    from apcm.wire.tensors import to_proto

    ch0, memory0, cluster0 = n0.stubs()
    memory0.CreateBank(memory_pb2.CreateBankRequest(name=name, capacity=4096), timeout=30,
                       metadata=LOCAL)
    written = {f"m{i}" for i in range(50)}
    memory0.Write(memory_pb2.WriteRequest(
        bank=name, codes=to_proto(codes(rng, 50)), mode=memory_pb2.WRITE_MODE_PER_ITEM,
        keys=sorted(written), payloads=[b"text payload"] * 50), timeout=30, metadata=LOCAL)
    with n1.client() as c:
        c.create_snapshot("before")  # shard 1 without the bank
    answer = cluster0.MoveBank(cluster_pb2.MoveBankRequest(name=name), timeout=60)
    assert (answer.from_shard, answer.to_shard, answer.bank.occupied) == (0, 1, 50)
    ch0.close()
    # durable through the log: no snapshot was written for the import
    assert [p.stem for p in _snapshot_files(n1)] == ["before"]
    imports = sorted((n1.data_dir / "imports").iterdir())
    assert len(imports) == 1 and imports[0].suffix == ".bank"
    with n0.client() as c:  # acknowledged writes after the move, through the other pod
        c.write(codes=codes(rng, 2), bank=name, mode="per_item", keys=["after0", "after1"])
        written |= {"after0", "after1"}
        c.create_snapshot("after")  # shard 1's holds the bank
    # kill -9, then the newest snapshot is found damaged: start-up falls back to the
    # older one and replays the import record and the writes after it
    n1.kill9()
    after = n1.data_dir / "snapshots" / "after.safetensors"
    raw = bytearray(after.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    after.write_bytes(bytes(raw))
    nodes.remove(n1)
    n1 = start(nodes, model_path, tmp_path, ports, range(1, 2))[0]
    assert "SKIPPING damaged snapshot after" in n1.output()
    assert stored_keys(n1, name) == written
    with n1.client() as c:
        assert c.describe_bank(name).occupied == 52
    # a torn import file is refused at start-up, never half-applied
    n1.kill9()
    nodes.remove(n1)
    good = imports[0].read_bytes()
    imports[0].write_bytes(good[: len(good) // 2])
    torn = Node(model_path, tmp_path, 1, ports)
    assert torn.proc.wait(START_TIMEOUT_S) != 0
    torn._log.close()
    assert f"import file {imports[0]}" in torn.output() and "torn" in torn.output()
    imports[0].write_bytes(good)  # repaired: it starts with every acknowledged write
    n1 = start(nodes, model_path, tmp_path, ports, range(1, 2))[0]
    assert stored_keys(n1, name) == written
    # once both newest snapshots hold the bank, its import file goes
    with n1.client() as c:
        c.create_snapshot("later-1")
        c.create_snapshot("later-2")
    assert not imports[0].exists()


def test_sdk_direct_routing_goes_to_the_owner_and_falls_back_to_the_entry_pod(
        nodes: list[Node], model_path: Path, tmp_path: Path) -> None:
    ports = free_ports(3)
    n0, n1, n2 = start(nodes, model_path, tmp_path, ports, range(3))
    on2, on1 = bank_owned_by(2, 3, "direct"), bank_owned_by(1, 3, "direct")
    rng = np.random.default_rng(5)
    x = codes(rng, 3)
    with MemoryClient(n0.address, timeout=30.0, routing="direct", retries=0) as c:
        for b in (on2, on1):
            c.create_bank(b, capacity=64)
            c.write(codes=x, bank=b, mode="per_item", keys=["a", "b", "c"])
        assert [r.hits[0].key for r in c.read(codes=x, bank=on2, top_k=1)] == ["a", "b", "c"]
        # with the entry pod gone, bank calls still reach their owners directly
        n0.kill9()
        assert c.describe_bank(on2).occupied == 3
        assert c.read(codes=x[:1], bank=on1, top_k=1)[0].hits[0].key == "a"
        with pytest.raises(UnavailableError):
            c.list_banks()  # not bank-scoped: it goes to the entry pod
    with MemoryClient(n1.address, timeout=30.0, routing="direct", retries=0) as c:
        assert c.describe_bank(on2).occupied == 3
        n2.kill9()  # the owner is down: the call falls back to the entry pod, which says so
        with pytest.raises(UnavailableError, match=re.escape(f"shard 2 (127.0.0.1:{ports[2]})")):
            c.describe_bank(on2)
    with pytest.raises(ValueError, match="routing"):
        MemoryClient(n1.address, routing="nearest")


def test_the_shard_map_needs_only_a_read_key_and_moves_a_read_write_key(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(api_keys="rw-key-123456", read_only_api_keys="ro-key-123456")
    read = (("authorization", "Bearer ro-key-123456"),)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        cluster = cluster_pb2_grpc.ClusterServiceStub(ch)
        info = cluster.GetClusterInfo(cluster_pb2.GetClusterInfoRequest(), timeout=10,
                                      metadata=read)
        assert info.shard_count == 1
        with pytest.raises(grpc.RpcError) as err:
            cluster.MoveBank(cluster_pb2.MoveBankRequest(name="default"), timeout=10,
                             metadata=read)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_cluster_calls_wait_for_readiness_but_the_shard_map_does_not(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    server.service.stop_serving()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        cluster = cluster_pb2_grpc.ClusterServiceStub(ch)
        assert cluster.GetClusterInfo(cluster_pb2.GetClusterInfoRequest(),
                                      timeout=10).shard_count == 1
        calls = {
            "MoveBank": lambda: cluster.MoveBank(cluster_pb2.MoveBankRequest(name="default"),
                                                 timeout=10),
            "ExportBank": lambda: list(cluster.ExportBank(
                cluster_pb2.ExportBankRequest(name="default"), timeout=10)),
            "ImportBank": lambda: cluster.ImportBank(chunks("default", b"x"), timeout=10),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
            assert "not ready" in (err.value.details() or ""), name
