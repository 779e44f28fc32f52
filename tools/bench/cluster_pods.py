"""Real ``apcm serve --cluster`` processes on loopback, and writers that record every
acknowledged write, for the cluster tests and ``apcm bench cluster``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from apcm.client import MemoryClient
from apcm.client.errors import ApcmError
from apcm.v1 import cluster_pb2, cluster_pb2_grpc

from .nats_cluster import free_ports

START_TIMEOUT_S = 120.0
BIND_RETRIES = 3
PORT_TAKEN = "Address already in use"


class Pod:
    """One pod: ``apcm serve`` in cluster mode with its own port, data dir and log."""

    def __init__(self, model: Path, root: Path, name: str, nats_urls: str,
                 port: int | None = None, **flags: object) -> None:
        self.name = name
        self.port = port or free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = root / f"{name}-data"
        self.log_path = root / f"{name}.log"
        self.flags: dict[str, object] = {
            "model": model, "data-dir": self.data_dir, "host": "127.0.0.1",
            "grpc-port": self.port, "metrics-port": -1, "device": "cpu",
            "default-bank-capacity": 64, "shutdown-grace-s": 0.5, "torch-threads": 1,
            "cluster": nats_urls, "node-id": name, "advertise-address": self.address,
            "cluster-shards": 8, **flags}
        self.proc: subprocess.Popen[bytes] | None = None
        self._start = 0

    def start(self) -> Pod:
        cmd = [sys.executable, "-m", "apcm.server.cli", "serve"]
        for k, v in self.flags.items():
            cmd += [f"--{k}", str(v)]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process keeps it)
        self._start = log.tell()  # a restart appends to the same log
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self) -> Pod:
        deadline = time.monotonic() + START_TIMEOUT_S
        rebinds = 0
        while time.monotonic() < deadline:
            if "apcm: serving gRPC on" in self.output()[self._start:]:
                return self
            if self.proc is not None and self.proc.poll() is not None:
                # free_ports only finds a port free a moment ago: another process may bind
                # it first. The pod fails before it joins the cluster, so a new port is safe.
                if rebinds < BIND_RETRIES and PORT_TAKEN in self.output()[self._start:]:
                    rebinds += 1
                    self._move_to(free_ports(1)[0])
                    self.start()
                    continue
                raise AssertionError(f"{self.name} exited:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not start:\n{self.output()[-4000:]}")

    def _move_to(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.flags.update({"grpc-port": port, "advertise-address": self.address})

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM: hands its shards over, then exits."""
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self, **kw: object) -> MemoryClient:
        return MemoryClient(self.address, **{"timeout": 30.0, **kw})  # type: ignore[arg-type]

    def info(self) -> cluster_pb2.ClusterInfo:
        with grpc.insecure_channel(self.address) as ch:
            return cluster_pb2_grpc.ClusterServiceStub(ch).GetClusterInfo(
                cluster_pb2.GetClusterInfoRequest(), timeout=10)


def settled(pods: list[Pod], replicas: int, timeout: float = 90.0) -> list[str]:
    """Waits until every pod sees every shard owned, exactly ``replicas`` caught-up holders
    each, and the same map; returns it (owner address per shard)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            infos = [p.info() for p in pods]
        except grpc.RpcError as e:
            last = e
            time.sleep(0.3)
            continue
        maps = {tuple(i.peers) for i in infos}
        live = {p.address for p in pods}
        holders = [[len(s.replicas) for s in i.shards] for i in infos]
        members = {tuple(i.members) for i in infos}
        if (len(maps) == 1 and set(next(iter(maps))) <= live and len(members) == 1
                and all(all(n == replicas for n in h) for h in holders)
                and len(next(iter(members))) == len(pods)):
            return list(infos[0].peers)
        last = (holders, [list(i.peers) for i in infos])
        time.sleep(0.3)
    raise AssertionError(f"the cluster did not settle: {last}")


@dataclass
class Writers:
    """One thread per bank, each writing one memory at a time through ``address``: a
    code of ``pool`` (thread i takes rows i, i + n, ...; distinct codes, so each reads
    back as its own top hit) under a unique key. Every acknowledged write is kept, to
    be checked afterwards; failures are counted (they are never acknowledged)."""

    address: str
    banks: list[str]
    pool: np.ndarray
    acked: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    failures: int = 0
    # per write: (monotonic time it was acknowledged, seconds it took)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Writers:
        for i, bank in enumerate(self.banks):
            self.acked[bank] = []
            t = threading.Thread(target=self._run, args=(i, bank), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, i: int, bank: str) -> None:
        rows = self.pool[i::len(self.banks)]
        n = 0
        with MemoryClient(self.address, timeout=20.0, retries=8) as c:
            while not self._stop.is_set() and n < len(rows):
                code = rows[n:n + 1]
                key = f"{bank}-{n}"
                n += 1
                t0 = time.monotonic()
                try:
                    c.write(codes=code, bank=bank, keys=[key], mode="per_item")
                except ApcmError:
                    with self._lock:
                        self.failures += 1
                    time.sleep(0.05)
                    continue
                done = time.monotonic()
                with self._lock:
                    self.acked[bank].append((key, code[0]))
                    self.timeline.append((done, done - t0, bank))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())


def missing(client: MemoryClient, acked: dict[str, list[tuple[str, np.ndarray]]]) -> list[str]:
    """Acknowledged keys the cluster does not return for their own code."""
    lost: list[str] = []
    for bank, writes in acked.items():
        for start in range(0, len(writes), 256):
            chunk = writes[start:start + 256]
            codes = np.stack([c for _, c in chunk])
            results = client.read(codes=codes, bank=bank, top_k=1, count_access=False,
                                  exhaustive=True)
            for (key, _), r in zip(chunk, results, strict=True):
                if not r.hits or r.hits[0].key != key:
                    lost.append(key)
    return lost
