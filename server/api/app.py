"""Building and running the server: ``build_server(settings)`` then ``serve()``.

Lifecycle (mirrors Kubernetes): health is NOT_SERVING from the moment the port
is bound until the codec is loaded, the banks are recovered and a warm-up
round trip has passed; on SIGTERM/SIGINT health goes NOT_SERVING, in-flight
RPCs get ``shutdown_grace_s`` to finish, and a final snapshot is written.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from apcm.v1 import memory_pb2, memory_pb2_grpc

from ..allocator import pin_mmap_threshold
from ..browser.http import MemoryBrowser
from ..cluster.router import ClusterRouter, PeerChannels
from ..cluster.servicer import SERVICE_NAME as CLUSTER_SERVICE_NAME
from ..cluster.servicer import add_to_server as add_cluster_service
from ..codecs.base import load_codec
from ..config import Settings
from ..domain.service import MemoryService
from ..domain.stores import new_store
from ..errors import ApcmError, FailedPrecondition
from ..metrics import Metrics
from ..startup_log import configure_logging, stage
from .browsing import start_browser
from .interceptors import (
    DecodeErrorInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    ReadinessInterceptor,
)
from .preflight import bind_failure, check_startup
from .servicer import MemoryServicer

log = logging.getLogger("apcm")
SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
# Health of writes alone: NOT_SERVING while the write-ahead log cannot make writes
# durable (disk full, I/O error), while reads still serve. Probes and load balancers
# that route writes can watch it; the plain service status stays about reads.
WRITES_HEALTH_NAME = f"{SERVICE_NAME}/Write"


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda was asked for, but CUDA is not available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _status(serving: bool) -> int:
    return (health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)


class ApcmServer:
    """The gRPC server plus everything it owns; ``start()``/``stop()`` drive its lifecycle."""

    def __init__(self, settings: Settings, service: MemoryService, grpc_server: grpc.Server,
                 port: int, health_servicer: health.HealthServicer) -> None:
        self.settings = settings
        self.service = service
        self.grpc_server = grpc_server
        self.port = port
        self.metrics_port: int | None = None
        self.browser_port: int | None = None
        self._browser: MemoryBrowser | None = None
        self.health = health_servicer
        self.cluster: Any = None  # cluster.node.ClusterNode in cluster mode
        self.router: ClusterRouter | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        service.on_serving_change = self._set_health
        service.persistence.add_wal_listener(lambda healthy: self._set_write_health())

    def _set_health(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, _status(serving))
        self.service.metrics.serving.set(1 if serving else 0)
        self._set_write_health()

    def _set_write_health(self) -> None:
        p = self.service.persistence
        self.health.set(WRITES_HEALTH_NAME, _status(self.service.ready and p.wal_healthy))

    def start(self) -> ApcmServer:
        """Bind, recover state, warm up, then report SERVING."""
        s = self.settings
        if s.metrics_port >= 0:
            try:
                self.metrics_port = self.service.metrics.start_http(s.metrics_host,
                                                                    s.metrics_port)
            except OSError as e:
                raise FailedPrecondition(
                    f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: "
                    f"{e.strerror or e}; choose another port with --metrics-port "
                    "(env APCM_METRICS_PORT, -1 disables metrics)") from e
        self.grpc_server.start()
        self._set_health(False)
        self.service.start()  # recovers (joins the cluster), warms up, reports SERVING
        started = start_browser(s, self.service)
        if started is not None:
            self._browser, self.browser_port = started
        log.info("serving %s on port %d", self.service.codec.name, self.port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain and shut down; safe to call more than once."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self.service.on_serving_change = lambda serving: None
            self.service.stop_serving()
            self.health.enter_graceful_shutdown()
            self.service.metrics.serving.set(0)
            grace = self.settings.shutdown_grace_s if grace is None else grace
            self.grpc_server.stop(grace).wait()
            if self._browser is not None:
                self._browser.stop()
            self.service.close()  # a cluster pod hands its shards over here
            if self.router is not None:
                self.router.close()
                self.router.peers.close()
            self.service.metrics.stop_http()
            self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


# grpcio-reflection (1.85) ships only grpc.reflection.v1alpha. The v1 service has the
# same messages field for field, so the v1alpha servicer answers v1 calls too when it
# is registered under the v1 name; grpcurl and newer clients ask for v1 first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1(server: grpc.Server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    servicer = reflection.ReflectionServicer(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": handler}),))


def receive_limit(max_message_bytes: int) -> int:
    """gRPC's receive limit: twice ``max_message_bytes`` (within gRPC's int32), so a
    request up to that size is refused by our check, which names the setting, rather
    than by gRPC's, which does not."""
    return min(2 * max_message_bytes, 2**31 - 1)


def build_server(
    settings: Settings, registry: CollectorRegistry | None = None
) -> tuple[ApcmServer, int]:
    """Load the codec and wire servicers, health, reflection and interceptors.

    Nothing is served until ``start()``. Returns the server and its bound port.
    Settings and the files they name are checked before the codec loads.
    """
    checked = check_startup(settings)
    pin_mmap_threshold()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    with stage("loaded the codec") as note:
        codec = load_codec(settings.model, device)
        note["detail"] = f"{codec.name} from {settings.model} on {device}"
    metrics = Metrics(registry)
    metrics.set_model(codec)
    cluster = router = None
    if settings.cluster:
        from ..cluster.node import ClusterNode  # nats-py: the cluster extra

        cluster = ClusterNode(settings, lambda: new_store(settings, codec),
                              codec.content_hash, codec.kind)
        router = ClusterRouter(cluster, settings.default_bank,
                               PeerChannels(settings.max_message_bytes),
                               settings.forward_timeout_s)
    service = MemoryService(settings, codec, metrics, cluster=cluster)

    auth = checked.auth
    interceptors: list[Any] = [
        *([router] if router else []),  # outermost: forwards before anything decodes
        MetricsInterceptor(metrics), *([auth] if auth else []), ErrorInterceptor(),
        ReadinessInterceptor(lambda: service.ready,
                             (f"/{SERVICE_NAME}/", f"/{CLUSTER_SERVICE_NAME}/"),
                             transient=bool(settings.cluster)),
        # innermost: its deserializer is the one grpc calls
        DecodeErrorInterceptor(settings.max_message_bytes),
    ]
    options = [
        ("grpc.max_receive_message_length", receive_limit(settings.max_message_bytes)),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="apcm"),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(service), server)
    add_cluster_service(cluster, server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, CLUSTER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME,
         REFLECTION_V1),
        server,
    )
    _add_reflection_v1(server)
    address = f"{settings.host}:{settings.grpc_port}"
    credentials = checked.credentials
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises a bare RuntimeError when the bind fails
        port = 0
    if port == 0:
        raise FailedPrecondition(
            f"cannot bind gRPC to {address}: {bind_failure(settings.host, settings.grpc_port)}; "
            "choose another --host or --port (env APCM_HOST, APCM_GRPC_PORT)")
    apcm_server = ApcmServer(settings, service, server, port, health_servicer)
    apcm_server.cluster, apcm_server.router = cluster, router
    if cluster is not None:
        cluster.address = settings.advertise_address or f"{cluster.host}:{port}"
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(WRITES_HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    return apcm_server, port


def serve(settings: Settings, started: float | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code.

    Args:
        started: ``time.monotonic()`` when the command began, for the SERVING line.
    """
    started = time.monotonic() if started is None else started
    configure_logging(settings.log_level)
    try:
        server, port = build_server(settings)
        server.start()
    except ApcmError as e:  # settings the model or the cluster refuse, NATS away
        log.error("cannot start: %s", e.message)
        return 2
    except OSError as e:
        # a write's error (disk full) carries no file name unless we put it there
        where = f"{e.filename}: " if e.filename else ""
        log.error("cannot start: %s%s", where, e.strerror or e)
        return 2
    except ValueError as e:  # bad TLS files, keys file, settings
        log.error("cannot start: %s", e)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="apcm-shutdown", daemon=True).start()

    # before the ready line: a supervisor that stops us as soon as it reads it must get
    # the graceful shutdown, not the default SIGTERM action
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("start-up: SERVING %.2f s after the command started", time.monotonic() - started)
    print(
        f"apcm: serving gRPC on {settings.host}:{port}"
        + (f", metrics on {settings.metrics_host}:{server.metrics_port}"
           if server.metrics_port is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    server.wait()
    log.info("stopped")
    return 0
