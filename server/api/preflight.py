"""Checks of the settings and of the files they name, made before the model and its
embedder load (20-80 s for a text model), so a configuration error shows at once
and names its cause."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

import grpc

from ..config import Settings
from ..domain.service import MemoryService
from .auth import build_auth_interceptor
from .tls import server_credentials

log = logging.getLogger("apcm")


@dataclass(frozen=True)
class Preflight:
    """What the checks built on the way: the port's credentials (None: plaintext) and
    the API-key interceptor (None: no keys)."""

    credentials: grpc.ServerCredentials | None
    auth: grpc.ServerInterceptor | None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as ``--host`` takes it: a name, an address, ``[::1]``) is
    reachable only from this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_startup(settings: Settings) -> Preflight:
    """Every check that needs no model.

    Raises:
        ValueError: a TLS file is missing, not PEM or not a matching pair; the keys
            file is malformed; cluster or embedder settings contradict each other.
        OSError: a file cannot be read.
    """
    credentials = server_credentials(settings)
    auth = build_auth_interceptor(settings)
    if settings.cluster and settings.tls_cert:
        raise ValueError("cluster mode with TLS is not supported yet: pods forward to each "
                         "other in plaintext")
    MemoryService.check_settings(settings)
    if auth is not None and credentials is None and not is_loopback(settings.host):
        log.warning(
            "API keys are configured but %s serves plaintext: every key crosses the network "
            "readable. Set --tls-cert and --tls-key, or bind --host to loopback behind a "
            "TLS-terminating proxy", settings.host)
    return Preflight(credentials, auth)


def bind_failure(host: str, port: int) -> str:
    """Why grpc could not bind ``host:port`` (it reports only that it failed): the
    error a plain socket gets binding the same address."""
    name = host.strip("[]")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {name!r} ({e.strerror})"
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as e:
        return e.strerror or str(e)
    return "grpc refused the address (it binds again now: another process may have just freed it)"
