"""Cluster mode on a real NATS JetStream cluster: 3 ``nats-server`` processes and 3–4
``apcm serve --cluster`` processes on loopback, every acknowledged write checked.

Each test gets its own NATS cluster (the streams and buckets are the cluster's
state). Waits are bounded; nothing asserts on timing: the bench measures that
(``apcm bench cluster``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from apcm.client import MemoryClient
from apcm.client.errors import FailedPreconditionError, UnavailableError
from apcm.server.cluster.router import FORWARDED_HEADER
from apcm.server.cluster.shardmap import shard_of
from apcm.tools.bench.cluster_pods import Pod, Writers, missing, settled
from apcm.tools.bench.nats_cluster import NatsCluster
from apcm.v1 import memory_pb2, memory_pb2_grpc

pytestmark = pytest.mark.timeout(600)
SHARDS = 8
LOCAL = ((FORWARDED_HEADER, "test"),)  # served by the pod it is sent to
CODE_DIM = 8  # the test model (conftest's float32 PCA) stores 8 values per memory
POOL = np.random.default_rng(7).standard_normal((100_000, CODE_DIM)).astype(np.float32)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for p in started:
        p.kill9()


def start_pods(pods: list[Pod], model: Path, root: Path, nats: NatsCluster, names: list[str],
               **flags: object) -> list[Pod]:
    new = [Pod(model, root, n, nats.urls, **{"cluster-shards": SHARDS, **flags})
           for n in names]
    pods.extend(new)
    for p in new:
        p.start()
    return [p.wait_serving() for p in new]


def owner_of_bank(owners: list[str], bank: str) -> str:
    return owners[shard_of(bank, SHARDS)]


def banks_owned_by(owners: list[str], address: str, n: int, prefix: str) -> list[str]:
    out = [f"{prefix}-{i}" for i in range(10_000) if owner_of_bank(owners, f"{prefix}-{i}")
           == address]
    return out[:n]


def local_reads(pod: Pod, bank: str) -> int:
    """The bank's reads counted by this pod's own replica."""
    with grpc.insecure_channel(pod.address) as ch:
        info = memory_pb2_grpc.MemoryServiceStub(ch).DescribeBank(
            memory_pb2.DescribeBankRequest(name=bank), timeout=10, metadata=LOCAL)
    return int(info.reads_total)


def create_banks(client: MemoryClient, banks: list[str], capacity: int = 8192) -> None:
    for b in banks:
        client.create_bank(b, capacity, exist_ok=True)


def test_three_pods_share_one_map_and_serve_every_bank_through_any_pod(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"])
    owners = settled([a, b, c], replicas=2)
    assert set(owners) <= {a.address, b.address, c.address}
    rng = np.random.default_rng(0)
    banks = [f"bank-{i}" for i in range(12)]
    written = {}
    with a.client() as ca:
        create_banks(ca, banks)
        for bank in banks:
            codes = rng.standard_normal((3, CODE_DIM)).astype(np.float32)
            ca.write(codes=codes, bank=bank, keys=[f"{bank}/{j}" for j in range(3)],
                     mode="per_item")
            written[bank] = [(f"{bank}/{j}", codes[j]) for j in range(3)]
    for pod in (a, b, c):  # strong reads (through each bank's owner) from every pod
        with pod.client() as cl:
            assert missing(cl, written) == []
            listed = {x.name: x.occupied for x in cl.list_banks()}
            assert {k: listed[k] for k in banks} == dict.fromkeys(banks, 3)
            assert "default" in listed
    # every holder of a shard applied the writes: a bank read on each of its replicas
    for bank in banks[:4]:
        holders = [p for p in (a, b, c)
                   if p.address in pods[0].info().shards[shard_of(bank, SHARDS)].replicas]
        assert len(holders) == 2
        for pod in holders:
            with grpc.insecure_channel(pod.address) as ch:
                info = memory_pb2_grpc.MemoryServiceStub(ch).DescribeBank(
                    memory_pb2.DescribeBankRequest(name=bank), timeout=10, metadata=LOCAL)
            assert info.occupied == 3, (bank, pod.name)
    # the SDK's direct routing sends each call to the shard's owner itself
    with c.client(routing="direct") as cd:
        code = rng.standard_normal((1, CODE_DIM)).astype(np.float32)
        cd.write(codes=code, bank=banks[5], keys=["direct"], mode="per_item")
        assert cd.read(codes=code, bank=banks[5])[0].hits[0].key == "direct"
    out = subprocess.run([sys.executable, "-m", "apcm.server.cli", "cluster", "info",
                          "--address", b.address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{SHARDS} shards" in out.stdout and out.stdout.count("owner pod-") == SHARDS
    # eventual reads through one pod spread over both replicas of a bank
    bank = banks[0]
    holders = [p for p in (a, b, c)
               if p.address in a.info().shards[shard_of(bank, SHARDS)].replicas]
    before = {p.name: local_reads(p, bank) for p in holders}
    with a.client(consistency="eventual") as ce:
        for _ in range(60):
            assert ce.read(codes=written[bank][0][1][None], bank=bank)[0].hits[0].key == \
                f"{bank}/0"
    served = {p.name: local_reads(p, bank) - before[p.name] for p in holders}
    assert sum(served.values()) == 60
    assert all(v > 0 for v in served.values()), served


def test_an_owner_killed_under_writers_with_its_disk_wiped_loses_no_acknowledged_write(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"])
    owners = settled([a, b, c], replicas=2)
    victim = max((b, c), key=lambda p: owners.count(p.address))
    banks = banks_owned_by(owners, victim.address, 4, "v") + [
        x for x in (f"o-{i}" for i in range(50)) if owner_of_bank(owners, x) != victim.address
    ][:4]
    with a.client() as ca:
        create_banks(ca, banks)
    victim_banks = banks[:4]
    reads_failed = 0
    writers = Writers(a.address, banks, POOL).start()
    time.sleep(3)
    killed_at = time.monotonic()
    victim.kill9()
    shutil.rmtree(victim.data_dir, ignore_errors=True)
    # reads of the victim's banks go on from their standby replica meanwhile
    survivor = next(p for p in (a, b, c) if p is not victim)
    with survivor.client(consistency="eventual", retries=0) as cr:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for bank in victim_banks:
                try:
                    cr.describe_bank(bank)
                except UnavailableError:
                    reads_failed += 1
            time.sleep(0.05)
    time.sleep(3)
    victim.start().wait_serving()
    time.sleep(3)
    writers.stop()
    after = [t for t, _, bank in writers.timeline if t > killed_at and bank in victim_banks]
    assert after, "no write to the killed owner's banks succeeded after the kill"
    assert writers.total() > 50
    with a.client() as ca:
        assert missing(ca, writers.acked) == []
    settled([a, b, c], replicas=2)
    with victim.client() as cv:  # the wiped pod rebuilt its replicas from the streams
        assert missing(cv, writers.acked) == []
    assert reads_failed == 0


def test_a_killed_nats_server_does_not_stop_writes(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"])
    settled([a, b, c], replicas=2)
    banks = [f"n-{i}" for i in range(4)]
    with a.client() as ca:
        create_banks(ca, banks)
    writers = Writers(b.address, banks, POOL).start()
    time.sleep(2)
    nats.servers[0].kill9()
    killed_at = time.monotonic()
    time.sleep(6)
    writers.stop()
    after = sum(1 for t, _, _ in writers.timeline if t > killed_at + 1)
    assert after > 20, f"only {after} writes acknowledged after a NATS server died"
    with c.client() as cc:
        assert missing(cc, writers.acked) == []


def test_a_paused_owner_cannot_append_after_a_standby_took_over(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"])
    owners = settled([a, b, c], replicas=2)
    victim = max((b, c), key=lambda p: owners.count(p.address))
    bank = banks_owned_by(owners, victim.address, 1, "p")[0]
    with a.client() as ca:
        create_banks(ca, [bank])
    writers = Writers(a.address, [bank], POOL).start()
    time.sleep(2)
    victim.signal(signal.SIGSTOP)
    # a write sent to the paused owner itself waits in its socket until it resumes
    late_code = np.full((1, CODE_DIM), 0.5, dtype=np.float32)
    late = memory_pb2.WriteRequest(bank=bank, codes=_codes_proto(late_code), keys=["late"],
                                   mode=memory_pb2.WRITE_MODE_PER_ITEM)
    ch = grpc.insecure_channel(victim.address)
    future = memory_pb2_grpc.MemoryServiceStub(ch).Write.future(late, timeout=30,
                                                                metadata=LOCAL)
    time.sleep(8)  # past the lease: a standby owns the shard and took writes
    taken_over = len(writers.acked[bank])
    victim.signal(signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as err:
        future.result()
    ch.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    time.sleep(3)
    writers.stop()
    assert len(writers.acked[bank]) > taken_over  # writes went on through the new owner
    for pod in (a, b, c):
        with pod.client() as cl:
            assert missing(cl, writers.acked) == []
            hit = cl.read(codes=late_code, bank=bank, top_k=1, count_access=False)[0].hits
            assert not hit or hit[0].key != "late"  # refused, and applied nowhere
            info = cl.describe_bank(bank)
            assert info.occupied == len(writers.acked[bank])  # nothing applied twice


def test_adding_a_fourth_pod_and_removing_one_under_writes(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"])
    settled([a, b, c], replicas=2)
    banks = [f"r-{i}" for i in range(8)]
    with a.client() as ca:
        create_banks(ca, banks)
    writers = Writers(a.address, banks, POOL).start()
    time.sleep(2)
    (d,) = start_pods(pods, model_path, tmp_path, nats, ["pod-d"])
    owners = settled([a, b, c, d], replicas=2)
    assert d.address in owners  # leadership moved to the new pod, no restart
    b.stop()  # removed: it hands its shards over before it exits
    owners = settled([a, c, d], replicas=2)
    assert b.address not in owners
    time.sleep(2)
    writers.stop()
    assert writers.total() > 50
    for pod in (a, c, d):
        with pod.client() as cl:
            assert missing(cl, writers.acked) == []
    infos = [p.info() for p in (a, c, d)]
    assert len({tuple(i.peers) for i in infos}) == 1
    for shard in infos[0].shards:  # one owner per shard, named with the same term
        assert len({(i.shards[shard.shard].owner_node, i.shards[shard.shard].term)
                    for i in infos}) == 1


def test_pods_with_no_disk_rebuild_from_snapshots_and_a_trimmed_stream(
        model_path: Path, tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    flags = {"cluster-snapshot-messages": 20, "snapshot-interval-s": 0}
    a, b, c = start_pods(pods, model_path, tmp_path, nats, ["pod-a", "pod-b", "pod-c"],
                         **flags)
    settled([a, b, c], replicas=2)
    rng = np.random.default_rng(1)
    written: dict[str, list[tuple[str, np.ndarray]]] = {"s": []}
    with a.client() as ca:
        create_banks(ca, ["s"])
        for i in range(120):
            code = rng.standard_normal((1, CODE_DIM)).astype(np.float32)
            ca.write(codes=code, bank="s", keys=[f"s-{i}"], mode="per_item")
            written["s"].append((f"s-{i}", code[0]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(
                [s for s in ca.list_snapshots() if s.name.startswith(
                    f"shard-{shard_of('s', SHARDS)}/")]) < 2:
            time.sleep(0.3)
        names = [s.name for s in ca.list_snapshots()]
    shard = shard_of("s", SHARDS)
    assert len([n for n in names if n.startswith(f"shard-{shard}/")]) == 2, names
    assert _first_stream_seq(nats, shard) > 1  # trimmed below the older kept snapshot
    for p in (a, b, c):
        p.kill9()
    # three new pods with empty disks: everything comes from the object store + streams
    fresh = start_pods(pods, model_path, tmp_path, nats, ["pod-x", "pod-y", "pod-z"], **flags)
    settled(fresh, replicas=2)
    for pod in fresh:
        with pod.client() as cl:
            assert missing(cl, written) == []


def test_a_pod_that_is_not_ready_answers_unavailable_a_single_server_failed_precondition(
        make_server, nats: NatsCluster) -> None:  # type: ignore[no-untyped-def]
    """A pod's refusal is transient (the SDK and a peer's router retry UNAVAILABLE,
    another pod serves meanwhile); a single server's restore is not (DESIGN.md)."""
    pod = make_server(cluster=nats.urls, node_id="solo", cluster_shards=2,
                      cluster_stream_replicas=1)
    single = make_server()
    for server, refusal in ((pod, UnavailableError), (single, FailedPreconditionError)):
        server.service.stop_serving()
        with MemoryClient(f"127.0.0.1:{server.port}", timeout=2, retries=0) as client, \
                pytest.raises(refusal, match="not ready"):
            client.read(codes=np.zeros((1, CODE_DIM), dtype=np.float32))


def _codes_proto(codes: np.ndarray) -> object:
    from apcm.wire.tensors import to_proto

    return to_proto(codes)


def _first_stream_seq(nats: NatsCluster, shard: int) -> int:
    import nats as nats_py

    async def first() -> int:
        nc = await nats_py.connect(nats.urls.split(","))
        try:
            info = await nc.jetstream().stream_info(f"APCM_SHARD_{shard}")
            return int(info.state.first_seq)
        finally:
            await nc.close()

    return asyncio.run(first())


def test_a_bank_codec_fitted_on_the_owner_is_replicated_and_survives_its_death(
        tmp_path: Path, nats: NatsCluster, pods: list[Pod]) -> None:
    from conftest import TEXT_MODEL
    from test_bank_codecs import _narrow

    a, b, c = start_pods(pods, TEXT_MODEL, tmp_path, nats, ["pod-a", "pod-b", "pod-c"],
                         **{"bank-codec-threshold": 400, "embedder": "none"})
    owners = settled([a, b, c], replicas=2)
    victim = max((b, c), key=lambda p: owners.count(p.address))
    bank = banks_owned_by(owners, victim.address, 1, "fit")[0]
    items = _narrow(600, 1, 2)
    with a.client() as ca:
        ca.create_bank(bank, 2000)
        ca.write(items[:500], bank=bank, mode="per_item",
                 keys=[f"m{i}" for i in range(500)])
        deadline = time.monotonic() + 120
        while (info := ca.describe_bank(bank)).codec is not None and \
                info.codec.state != "own" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert info.codec is not None and info.codec.state == "own"
        ca.write(items[500:], bank=bank, mode="per_item",
                 keys=[f"m{i}" for i in range(500, 600)])
        before = ca.read(items[:40], bank=bank, top_k=3, reconstruct=True)
    holders = [p for p in (a, b, c)
               if p.address in a.info().shards[shard_of(bank, SHARDS)].replicas]
    for pod in holders:  # the standby applied the owner's codec record
        with grpc.insecure_channel(pod.address) as ch:
            local = memory_pb2_grpc.MemoryServiceStub(ch).DescribeBank(
                memory_pb2.DescribeBankRequest(name=bank), timeout=10, metadata=LOCAL)
        assert local.codec.model_hash == info.codec.model_hash and local.occupied == 600
    victim.kill9()
    survivor = next(p for p in (a, b, c) if p is not victim)
    with survivor.client() as cs:
        deadline = time.monotonic() + 60
        while True:
            try:
                after = cs.read(items[:40], bank=bank, top_k=3, reconstruct=True)
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "no pod took the killed owner's bank over"
                time.sleep(0.3)
        moved = cs.describe_bank(bank).codec
        assert moved is not None and moved.staged == 100  # the later writes, replicated
        assert dataclasses.replace(moved, staged=0) == info.codec
    for e, g in zip(before, after, strict=True):
        assert [h.key for h in g.hits] == [h.key for h in e.hits]
        for he, hg in zip(e.hits, g.hits, strict=True):
            np.testing.assert_array_equal(hg.reconstruction, he.reconstruction)
