"""The shipped IDRP v2 text model through the real server and client: uint8 codes on
the wire, Read ranking identical to exact cosine on the decoded memories, per-item
domain checks from Compress and Write (and their metric), an old IDRP v1 file
still served, and a data dir of another model refused with a way out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import server_settings
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file

from apcm.client import MemoryClient
from apcm.server.api.app import build_server

ROOT = Path(__file__).resolve().parents[1]
V2 = ROOT / "model_weights" / "text-minilm.safetensors"
V1 = ROOT / "model_weights" / "text-minilm-v1.safetensors"
FIXTURE = ROOT / "tests" / "fixtures" / "text_v2_heldout.safetensors"


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE))


@pytest.fixture
def v2_client(make_server):  # type: ignore[no-untyped-def]
    server = make_server(model=V2, default_bank_capacity=1024, metrics_port=0)
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        yield client, server


def _items(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), 1, -1)


def test_model_info_says_uint8_bytes(v2_client) -> None:  # type: ignore[no-untyped-def]
    client, _ = v2_client
    info = client.model_info()
    assert info.code_dtype == "uint8" and info.code_dim == 192
    assert info.compression_ratio == pytest.approx(8.0)


def test_read_ranks_exactly_as_cosine_on_decoded_memories(  # type: ignore[no-untyped-def]
        v2_client, fixture: dict[str, np.ndarray]) -> None:
    client, _ = v2_client
    memories = np.concatenate([fixture["test"][100:], fixture["fortunes"][100:],
                               fixture["licenses"][50:]])
    queries = np.concatenate([fixture["test"][:100], fixture["fortunes"][:100],
                              fixture["licenses"][:50]])
    codes = client.compress(_items(memories))
    assert codes.dtype == np.uint8 and codes.shape == (len(memories), 192)
    client.write(codes=codes, mode="per_item", bank="")
    decoded = client.decompress(codes).reshape(len(memories), -1).astype(np.float64)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ \
        (decoded / np.linalg.norm(decoded, axis=1, keepdims=True)).T
    results = client.read(_items(queries), top_k=10, count_access=False)
    same = 0
    for q, res in enumerate(results):
        want = np.argsort(-cos[q])[:10]
        got = [h.slot for h in res.hits]
        same += set(got) == set(want.tolist())
        np.testing.assert_allclose([h.score for h in res.hits], cos[q, got], atol=1e-5)
    assert same == len(queries)
    # the soft read mixes every decoded memory (before renormalisation) by its weight
    soft = client.read(_items(queries[:3]), top_k=1, temperature=0.1, soft=True,
                       count_access=False)
    weights = np.exp((cos[:3] - 1) / 0.1)
    weights /= weights.sum(1, keepdims=True)
    for q, res in enumerate(soft):
        mix = res.soft_reconstruction.reshape(-1)
        assert mix.shape == (384,) and np.isfinite(mix).all()
        want = weights[q] @ decoded
        assert float(mix @ want / np.linalg.norm(mix) / np.linalg.norm(want)) > 0.999


def test_compress_flags_what_the_model_does_not_know(  # type: ignore[no-untyped-def]
        v2_client, fixture: dict[str, np.ndarray]) -> None:
    client, _ = v2_client
    gen = torch.Generator().manual_seed(0)
    test = fixture["test"]
    rot, _ = torch.linalg.qr(torch.randn(384, 384, generator=gen, dtype=torch.float64))
    rand = torch.randn(200, 384, generator=gen).numpy()
    cases = {
        "random": rand,
        "random unit": rand / np.linalg.norm(rand, axis=1, keepdims=True),
        "x1.1": test * 1.1,
        "x0.9": test * 0.9,
        "other embedder": (torch.from_numpy(test).double() @ rot).float().numpy(),
    }
    for name, x in cases.items():
        codes, checks = client.compress_checked(_items(x))
        assert len(checks) == len(x) and codes.shape == (len(x), 192)
        flagged = np.mean([c.out_of_domain for c in checks])
        assert flagged >= 0.95, (name, flagged)
    codes, checks = client.compress_checked(_items(test))
    assert np.mean([c.out_of_domain for c in checks]) <= 0.05
    assert not any(c.norm_off for c in checks)
    decoded = client.decompress(codes).reshape(len(test), -1)
    np.testing.assert_allclose([c.reconstruction_error for c in checks],
                               ((decoded - test) ** 2).sum(1), rtol=1e-3, atol=1e-6)


def test_write_returns_checks_and_feeds_the_metric(  # type: ignore[no-untyped-def]
        v2_client, fixture: dict[str, np.ndarray]) -> None:
    client, server = v2_client
    x = np.concatenate([fixture["test"][:20], np.random.default_rng(0).standard_normal(
        (5, 384)).astype(np.float32)])
    written = client.write(_items(x), mode="per_item")
    assert len(written) == 25 and len(written.checks) == 25
    assert [c.out_of_domain for c in written.checks[20:]] == [True] * 5
    mean = client.write(_items(x[:4]))
    assert len(mean) == 1 and len(mean.checks) == 4
    written = client.write(codes=client.compress(_items(x[:3])), mode="per_item")
    assert written.checks == []
    registry = server.service.metrics.registry
    count = registry.get_sample_value("apcm_item_in_domain_percentile_ratio_count",
                                      {"method": "Write"})
    flagged = registry.get_sample_value("apcm_items_out_of_domain_total", {"method": "Write"})
    assert count == 29 and flagged is not None and flagged >= 5


def test_an_idrp_v1_file_still_serves(make_server, fixture) -> None:  # type: ignore[no-untyped-def]
    server = make_server(model=V1)
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        info = client.model_info()
        assert info.code_dtype == "int8" and info.code_dim == 192
        codes, checks = client.compress_checked(_items(fixture["test"][:50]))
        assert codes.dtype == np.int8 and checks == []
        client.write(codes=codes, mode="per_item")
        hits = client.read(_items(fixture["test"][:5]), top_k=1)
        assert [r.hits[0].slot for r in hits] == list(range(5))


def test_a_data_dir_of_another_model_is_refused(make_server, tmp_path,  # type: ignore[no-untyped-def]
                                                fixture) -> None:
    data = tmp_path / "data"
    server = make_server(model=V1, data_dir=data)
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        client.write(_items(fixture["test"][:3]), mode="per_item")
        client.create_snapshot("before-upgrade")
    server.stop(grace=0.5)
    with pytest.raises(Exception, match="empty --data-dir") as err:
        srv, _ = build_server(server_settings(V2, data), registry=CollectorRegistry())
        srv.start()
        srv.stop(grace=0.5)
    assert "serve that model" in str(err.value)


def test_packed_codes_survive_a_restart(make_server, tmp_path, fixture) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    x = _items(fixture["licenses"][:40])
    server = make_server(model=V2, data_dir=data)
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        client.write(x[:20], mode="per_item")
        client.create_snapshot("half")
        client.write(x[20:], mode="per_item")  # only in the write-ahead log
        before = client.read(x[:5], top_k=3, count_access=False)
    server.stop(grace=0.5)
    again = make_server(model=V2, data_dir=data)
    with MemoryClient(f"127.0.0.1:{again.port}", timeout=60.0) as client:
        assert client.describe_bank("default").occupied == 40
        after = client.read(x[:5], top_k=3, count_access=False)
    for a, b in zip(before, after, strict=True):
        assert [h.slot for h in a.hits] == [h.slot for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits],
                                   atol=1e-6)


def test_async_client_returns_checks_too(v2_client, fixture) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from apcm.client import AsyncMemoryClient

    _, server = v2_client

    async def go() -> tuple[np.ndarray, list, list]:  # type: ignore[type-arg]
        async with AsyncMemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as aclient:
            codes, checks = await aclient.compress_checked(_items(fixture["test"][:4]))
            written = await aclient.write(_items(fixture["test"][:4]), mode="per_item")
            return codes, checks, written.checks

    codes, checks, written = asyncio.run(go())
    assert codes.dtype == np.uint8 and len(checks) == 4 and len(written) == 4
    assert [c.in_domain_percentile for c in checks] == \
        pytest.approx([c.in_domain_percentile for c in written])


def test_the_flow_model_reads_exactly_too(make_server, fixture) -> None:  # type: ignore[no-untyped-def]
    """With a trained flow the bank scores in the input space (memories decoded)."""
    server = make_server(model=ROOT / "model_weights" / "text-minilm-flow.safetensors",
                         default_bank_capacity=1024)
    memories, queries = fixture["fortunes"][50:250], fixture["fortunes"][:20]
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        codes = client.compress(_items(memories))
        client.write(codes=codes, mode="per_item")
        decoded = client.decompress(codes).reshape(len(memories), -1).astype(np.float64)
        results = client.read(_items(queries), top_k=10, count_access=False)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ \
        (decoded / np.linalg.norm(decoded, axis=1, keepdims=True)).T
    for q, res in enumerate(results):
        assert {h.slot for h in res.hits} == set(np.argsort(-cos[q])[:10].tolist())
        np.testing.assert_allclose([h.score for h in res.hits],
                                   cos[q, [h.slot for h in res.hits]], atol=1e-5)
