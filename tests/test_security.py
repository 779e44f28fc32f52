"""API keys, TLS and mTLS against a real server through the real client.

A CA, a server certificate (SAN localhost / 127.0.0.1) and client certificates
are generated here with ``cryptography``; nothing is mocked.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apcm.client import (
    MemoryClient,
    PermissionDeniedError,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from apcm.server.api.app import ApcmServer, build_server
from apcm.server.api.auth import KeyRing, Role, bearer_token, read_keys_file
from apcm.server.api.tls import server_credentials
from apcm.server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
RW_KEY = "rw-0123456789abcdef0123456789abcdef"
RO_KEY = "ro-fedcba9876543210fedcba9876543210"
WRONG_KEY = "wrong-00000000000000000000000000000"


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate and client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by an unrelated CA
    rogue_key: Path

    def read(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca("apcm test CA")
    server = _leaf(ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    client = _leaf(ca, "apcm test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    rogue = _leaf(_ca("rogue CA"), "rogue client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    (d / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=d / "ca.pem",
        server_cert=_write(d / "server.pem", *server),
        server_key=d / "server.key",
        client_cert=_write(d / "client.pem", *client),
        client_key=d / "client.key",
        rogue_cert=_write(d / "rogue.pem", *rogue),
        rogue_key=d / "rogue.key",
    )


# ---------------------------------------------------------------- servers


@pytest.fixture
def keyed_server(make_server: Callable[..., ApcmServer]) -> str:
    server = make_server(api_keys=RW_KEY, read_only_api_keys=RO_KEY)
    return f"127.0.0.1:{server.port}"


def _inputs(digits: np.ndarray, n: int = 4) -> np.ndarray:
    return digits[1200 : 1200 + n].copy()


# ---------------------------------------------------------------- API keys


def test_no_key_is_unauthenticated(keyed_server: str, digits: np.ndarray) -> None:
    with MemoryClient(keyed_server, timeout=10) as client:
        with pytest.raises(UnauthenticatedError, match="missing API key"):
            client.compress(_inputs(digits))
        with pytest.raises(UnauthenticatedError):
            client.write(_inputs(digits))


def test_wrong_key_is_unauthenticated(keyed_server: str, digits: np.ndarray) -> None:
    with (
        MemoryClient(keyed_server, timeout=10, api_key=WRONG_KEY) as client,
        pytest.raises(UnauthenticatedError, match="invalid API key"),
    ):
        client.model_info()
    # A valid key's prefix is not a valid key.
    with (
        MemoryClient(keyed_server, timeout=10, api_key=RW_KEY[:-1]) as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.write(_inputs(digits))


def test_read_write_key_writes_and_reads_back(keyed_server: str, digits: np.ndarray) -> None:
    x = _inputs(digits)
    with MemoryClient(keyed_server, timeout=10, api_key=RW_KEY) as client:
        written = client.write(x, mode="per_item", payloads=[f"m{i}" for i in range(len(x))])
        assert len(written) == len(x)
        hits = client.read(x[2:3], top_k=1, payloads=True)[0].hits
        assert hits[0].slot == written[2].slot
        assert hits[0].payload == b"m2"


def test_read_only_key_may_use_every_read_rpc(keyed_server: str, digits: np.ndarray) -> None:
    x = _inputs(digits)
    with MemoryClient(keyed_server, timeout=10, api_key=RW_KEY) as writer:
        slot = writer.write(x[:1], payloads="only")[0].slot
        codes_rw = writer.compress(x)
    with MemoryClient(keyed_server, timeout=10, api_key=RO_KEY) as reader:
        assert reader.model_info().code_dim == codes_rw.shape[1]
        codes = reader.compress(x)
        np.testing.assert_array_equal(codes, codes_rw)
        assert reader.decompress(codes).shape == x.shape
        hit = reader.read(x[:1], top_k=1, payloads=True)[0].hits[0]
        assert (hit.slot, hit.payload) == (slot, b"only")
        default = reader.list_banks()[0]
        assert reader.describe_bank(default.name).occupied == 1
        assert reader.list_snapshots() == []


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c, x: c.write(x), id="Write"),
        pytest.param(lambda c, x: c.create_bank("ro-made", 8), id="CreateBank"),
        pytest.param(lambda c, x: c.delete_slots("default", slots=[0]), id="DeleteSlots"),
        pytest.param(lambda c, x: c.clear_bank("default"), id="ClearBank"),
        pytest.param(lambda c, x: c.drop_bank("default"), id="DropBank"),
        pytest.param(lambda c, x: c.create_snapshot(), id="CreateSnapshot"),
        pytest.param(lambda c, x: c.restore_snapshot("any"), id="RestoreSnapshot"),
    ],
)
def test_read_only_key_cannot_change_anything(
    keyed_server: str, digits: np.ndarray, call: Callable[[MemoryClient, np.ndarray], object]
) -> None:
    x = _inputs(digits)
    with MemoryClient(keyed_server, timeout=10, api_key=RO_KEY) as reader:
        before = reader.describe_bank("default")
        with pytest.raises(PermissionDeniedError, match="read-write API key"):
            call(reader, x)
        after = reader.describe_bank("default")
        assert [b.name for b in reader.list_banks()] == ["default"]
        assert reader.list_snapshots() == []
    assert (after.occupied, after.capacity) == (before.occupied, before.capacity)


def test_health_check_needs_no_key_reflection_does(keyed_server: str) -> None:
    with MemoryClient(keyed_server, timeout=10) as client:
        assert client.health() == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as exc:
            next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = next(stub.ServerReflectionInfo(
            iter([request]), timeout=10, metadata=(("authorization", f"Bearer {RW_KEY}"),)))
    names = {s.name for s in reply.list_services_response.service}
    assert "apcm.v1.MemoryService" in names


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (f"bearer {RW_KEY}", grpc.StatusCode.OK),  # the scheme is case-insensitive
        (f"Bearer   {RW_KEY}  ", grpc.StatusCode.OK),
        (f"Basic {RW_KEY}", grpc.StatusCode.UNAUTHENTICATED),
        (RW_KEY, grpc.StatusCode.UNAUTHENTICATED),
        ("Bearer ", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_authorization_header_forms(
    keyed_server: str, header: str, code: grpc.StatusCode
) -> None:
    with MemoryClient(keyed_server, timeout=10) as client:
        get_info = client.channel.unary_unary("/apcm.v1.MemoryService/GetModelInfo")
        try:
            get_info(b"", timeout=10, metadata=(("authorization", header),))
            got = grpc.StatusCode.OK
        except grpc.RpcError as e:
            got = e.code()
    assert got == code


def test_keys_are_never_logged(
    keyed_server: str, digits: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for key in (WRONG_KEY, RO_KEY):
        with (
            MemoryClient(keyed_server, timeout=10, api_key=key) as client,
            pytest.raises((UnauthenticatedError, PermissionDeniedError)),
        ):
            client.write(_inputs(digits))
    assert any("rejected" in r.getMessage() for r in caplog.records)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for key in (WRONG_KEY, RO_KEY, RW_KEY):
        assert key not in text


def test_keys_file_roles(
    make_server: Callable[..., ApcmServer], tmp_path: Path, digits: np.ndarray
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"# operators\nrw:{RW_KEY}\n\n ro: {RO_KEY} \n", encoding="utf-8")
    server = make_server(api_keys_file=str(keys))
    address = f"127.0.0.1:{server.port}"
    with MemoryClient(address, timeout=10, api_key=RW_KEY) as writer:
        assert len(writer.write(_inputs(digits))) == 1
    with MemoryClient(address, timeout=10, api_key=RO_KEY) as reader:
        assert reader.describe_bank("default").occupied == 1
        with pytest.raises(PermissionDeniedError):
            reader.clear_bank("default")


def test_malformed_keys_file_refuses_to_start_without_echoing_it(
    model_path: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"rw:{RW_KEY}\n{RO_KEY}\n", encoding="utf-8")
    settings = Settings(model=str(model_path), device="cpu", api_keys_file=str(keys),
                        data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"api-keys:2: expected 'rw:KEY' or 'ro:KEY'") as info:
        build_server(settings)
    assert RO_KEY not in str(info.value)


def test_keyring_roles_and_conflicts(tmp_path: Path) -> None:
    ring = KeyRing.from_keys([RW_KEY, ""], [RO_KEY])
    assert len(ring) == 2
    assert ring.role_of(RW_KEY) is Role.READ_WRITE
    assert ring.role_of(RO_KEY) is Role.READ_ONLY
    assert ring.role_of(RW_KEY + "x") is None
    assert ring.role_of("") is None
    with pytest.raises(ValueError, match="both read-write and read-only"):
        KeyRing.from_keys([RW_KEY], [RW_KEY])
    path = tmp_path / "keys"
    path.write_text("rw:a\nro:b\nrw:c\n", encoding="utf-8")
    assert read_keys_file(path) == (["a", "c"], ["b"])
    assert bearer_token([("x-other", "y"), ("authorization", b"Bearer k")]) == "k"


# ---------------------------------------------------------------- TLS


def test_tls_round_trip_matches_in_process_codec(
    make_server: Callable[..., ApcmServer], pki: Pki, codec: object, digits: np.ndarray
) -> None:
    from float_bounds import assert_within_bound, pca_decode_bound, pca_encode_bound

    server = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    tls = TLSConfig(root_certificates=pki.read("ca"))
    x = _inputs(digits)
    with MemoryClient(f"localhost:{server.port}", timeout=10, tls=tls) as client:
        codes = client.compress(x)
        recon = client.decompress(codes)
    assert_within_bound(codes, *pca_encode_bound(codec, x), "codes")
    assert_within_bound(recon.reshape(len(x), -1), *pca_decode_bound(codec, codes), "items")


def test_tls_server_refuses_plaintext_and_untrusted_clients(
    make_server: Callable[..., ApcmServer], pki: Pki
) -> None:
    server = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    address = f"127.0.0.1:{server.port}"
    with (
        MemoryClient(address, timeout=3, retries=0) as plain,
        pytest.raises(UnavailableError),
    ):
        plain.model_info()
    # The client trusts a CA that did not sign the server certificate.
    wrong_ca = TLSConfig(root_certificates=pki.read("rogue_cert"))
    with (
        MemoryClient(address, timeout=3, retries=0, tls=wrong_ca) as client,
        pytest.raises(UnavailableError),
    ):
        client.model_info()


def test_tls_with_api_key_via_ip_and_server_name(
    make_server: Callable[..., ApcmServer], pki: Pki
) -> None:
    server = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                         api_keys=RW_KEY)
    tls = TLSConfig(root_certificates=pki.read("ca"), server_name="localhost")
    address = f"127.0.0.1:{server.port}"
    with MemoryClient(address, timeout=10, tls=tls, api_key=RW_KEY) as client:
        assert client.model_info().code_dim == 8
    with (
        MemoryClient(address, timeout=10, tls=tls) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.model_info()


@pytest.fixture
def mtls_address(make_server: Callable[..., ApcmServer], pki: Pki) -> str:
    server = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                         tls_client_ca=str(pki.ca))
    return f"localhost:{server.port}"


def test_mtls_with_client_certificate(mtls_address: str, pki: Pki, digits: np.ndarray) -> None:
    tls = TLSConfig(root_certificates=pki.read("ca"), certificate_chain=pki.read("client_cert"),
                    private_key=pki.read("client_key"))
    x = _inputs(digits)
    with MemoryClient(mtls_address, timeout=10, tls=tls) as client:
        assert client.decompress(client.compress(x)).shape == x.shape


@pytest.mark.parametrize("client_cert", [None, "rogue"], ids=["no-cert", "cert-from-other-ca"])
def test_mtls_rejects_clients_without_a_trusted_certificate(
    mtls_address: str, pki: Pki, client_cert: str | None
) -> None:
    chain = key = None
    if client_cert:
        chain, key = pki.read(f"{client_cert}_cert"), pki.read(f"{client_cert}_key")
    tls = TLSConfig(root_certificates=pki.read("ca"), certificate_chain=chain, private_key=key)
    with (
        MemoryClient(mtls_address, timeout=3, retries=0, tls=tls) as client,
        pytest.raises(UnavailableError),
    ):
        client.model_info()


def test_server_credentials_validation(pki: Pki, tmp_path: Path) -> None:
    assert server_credentials(Settings()) is None
    ok = Settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    assert isinstance(server_credentials(ok), grpc.ServerCredentials)
    with pytest.raises(ValueError, match="tls_client_ca .* needs tls_cert"):
        server_credentials(Settings(tls_client_ca=str(pki.ca)))
    with pytest.raises(ValueError, match="tls_cert: cannot read"):
        server_credentials(ok.replace(tls_cert=str(tmp_path / "missing.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate", encoding="utf-8")
    with pytest.raises(ValueError, match="tls_key: .* is not a PEM file"):
        server_credentials(ok.replace(tls_key=str(junk)))


# ---------------------------------------------------------------- container health check


def healthcheck_module() -> ModuleType:
    path = ROOT / "deploy" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("apcm_healthcheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_container_healthcheck_over_plaintext_tls_and_mtls(
    make_server: Callable[..., ApcmServer], pki: Pki
) -> None:
    check = healthcheck_module().check
    keyed = make_server(api_keys=RW_KEY)
    assert check({"APCM_GRPC_PORT": str(keyed.port)})
    tls = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    tls_env = {"APCM_GRPC_PORT": str(tls.port), "APCM_TLS_CERT": str(pki.server_cert),
               "APCM_TLS_KEY": str(pki.server_key), "APCM_HEALTHCHECK_CA": str(pki.ca)}
    assert check(tls_env)
    # A certificate that is not in the server's chain verifies nothing.
    assert not check({**tls_env, "APCM_HEALTHCHECK_CA": str(pki.client_cert)}, timeout_s=2)
    mtls = make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                       tls_client_ca=str(pki.ca))
    mtls_env = {**tls_env, "APCM_GRPC_PORT": str(mtls.port), "APCM_TLS_CLIENT_CA": str(pki.ca),
                "APCM_HEALTHCHECK_CERT": str(pki.client_cert),
                "APCM_HEALTHCHECK_KEY": str(pki.client_key)}
    assert check(mtls_env)
    assert not check({**mtls_env, "APCM_HEALTHCHECK_CERT": str(pki.rogue_cert),
                      "APCM_HEALTHCHECK_KEY": str(pki.rogue_key)}, timeout_s=2)


def test_container_healthcheck_exit_status(make_server: Callable[..., ApcmServer]) -> None:
    server = make_server()
    script = str(ROOT / "deploy/healthcheck.py")
    env = {**os.environ, "APCM_GRPC_PORT": str(server.port)}
    assert subprocess.run([sys.executable, script], env=env, timeout=60).returncode == 0
    server.stop(grace=0.1)
    down = subprocess.run([sys.executable, script], env=env, timeout=60, capture_output=True,
                          text=True)
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
