"""Channel construction shared by the sync and asyncio clients.

One place decides the channel options (message limits that match the server,
keepalive, reconnect pacing), the transport security (TLS, mTLS) and the
per-call auth metadata, so both clients behave identically on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .retry import RetryPolicy

DEFAULT_ADDRESS = "localhost:50051"
# Matches the server's default max_message_bytes, so a request the server
# would accept is never refused by the client first.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "apcm-client/0.1"
# Pings only while calls are in flight and no more often than the server's
# default enforcement allows, so idle clients are never sent GOAWAY.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TLSConfig:
    """Transport security for the channel (PEM bytes).

    Attributes:
        root_certificates: CA bundle that signed the server certificate;
            None uses the system roots.
        certificate_chain: client certificate, for servers that require mTLS.
        private_key: key of the client certificate.
        server_name: expected name in the server certificate when it differs
            from the address host (e.g. a self-signed "localhost" certificate
            reached through 127.0.0.1).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key must be given together")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        """Read the PEM files (any of them may be omitted)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(root_certificates), read(certificate_chain), read(private_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def resolve_tls(tls: bool | TLSConfig | None) -> TLSConfig | None:
    """``True`` means TLS with the system roots; ``False``/None means plaintext."""
    if isinstance(tls, TLSConfig):
        return tls
    return TLSConfig() if tls else None


def channel_options(
    max_message_bytes: int,
    retry: RetryPolicy,
    tls: TLSConfig | None,
    extra: ChannelOptions = (),
) -> list[tuple[str, Any]]:
    """The options both clients open their channel with; ``extra`` wins on conflict."""
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.primary_user_agent": USER_AGENT,
        # The channel's own reconnect backoff starts at 1 s; while it runs, every
        # retry fails fast with UNAVAILABLE. Pace reconnects like our retries.
        # (Not grpc.min_reconnect_backoff_ms: grpc-core reads that one as the
        # minimum connect timeout, and a short one breaks slow TLS handshakes.)
        "grpc.initial_reconnect_backoff_ms": _ms(retry.initial_backoff_s),
        "grpc.max_reconnect_backoff_ms": max(_ms(retry.max_backoff_s), 1000),
    }
    if tls is not None and tls.server_name:
        options["grpc.ssl_target_name_override"] = tls.server_name
    options.update(dict(extra))
    return list(options.items())


CONSISTENCIES = ("strong", "eventual")


def auth_metadata(api_key: str | None, consistency: str = "strong"
                  ) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: ``authorization: Bearer <key>`` when a key is set,
    and ``apcm-consistency: eventual`` when reads may come from any replica."""
    if consistency not in CONSISTENCIES:
        raise ValueError(f"consistency must be one of {CONSISTENCIES}, not {consistency!r}")
    md = (("apcm-consistency", "eventual"),) if consistency == "eventual" else ()
    if not api_key:
        return md
    if any(c in api_key for c in "\r\n") or api_key != api_key.strip():
        raise ValueError("api_key must not contain line breaks or surrounding spaces")
    return (("authorization", f"Bearer {api_key}"), *md)


def open_channel(
    address: str,
    options: ChannelOptions,
    tls: TLSConfig | None,
    interceptors: Sequence[Any] = (),
) -> grpc.Channel:
    """A blocking channel, optionally wrapped by client interceptors."""
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def open_aio_channel(
    address: str,
    options: ChannelOptions,
    tls: TLSConfig | None,
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """An asyncio channel; ``interceptors`` are ``grpc.aio.ClientInterceptor`` objects."""
    chain = list(interceptors) or None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=chain)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options, interceptors=chain)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
