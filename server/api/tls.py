"""gRPC server credentials from settings: plaintext, TLS, or mutual TLS.

``tls_cert`` + ``tls_key`` turn TLS on; ``tls_client_ca`` additionally makes the
server require and verify a client certificate signed by that CA (mTLS).
The files are PEM and read once, at start-up.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from ..config import Settings


def _read_pem(setting: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{setting}: cannot read {path}: {e.strerror}") from e
    # grpc only reports a bad PEM as an opaque failure when the port is bound.
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting}: {path} is not a PEM file")
    return data


def _check_pair(cert: str, key: str) -> None:
    """grpc reports a key that does not fit its certificate only as a failed bind,
    which reads like a port in use; OpenSSL names the cause."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"tls_key {key} is not the private key of the certificate "
                             f"{cert}: give the key the certificate was issued for") from e
        raise ValueError(f"cannot load the TLS certificate {cert} with the key {key}: "
                         f"{e.reason or e} (an encrypted key is not supported)") from e


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for ``server.add_secure_port``, or ``None`` for a plaintext port.

    Raises:
        ValueError: a file is missing or not PEM, the key does not fit the
            certificate, only one of cert/key is set, or a client CA is given without
            a server certificate.
    """
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return None
    if not settings.tls_cert or not settings.tls_key:
        raise ValueError("tls_cert and tls_key must be given together")
    cert = _read_pem("tls_cert", settings.tls_cert)
    key = _read_pem("tls_key", settings.tls_key)
    _check_pair(settings.tls_cert, settings.tls_key)
    client_ca = (
        _read_pem("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
