"""``--memory-limit-bytes`` counts everything a bank holds: metadata (charged when it
is written), the lexical (BM25) index of its texts and its IVF lists, and
``memory_bytes`` reports them. Real servers, real clients."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import start_text_server
from prometheus_client import generate_latest

from apcm.client import LimitExceededError, MemoryClient
from apcm.server.api.app import ApcmServer
from apcm.server.memory.bank import MemoryBank

pytestmark = pytest.mark.timeout(240)
BIG_METADATA = {f"{k:02d}" + "k" * 62: "v" * 256 for k in range(16)}  # the largest allowed


def _used_bytes(srv: ApcmServer) -> int:
    text = generate_latest(srv.service.metrics.registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith("apcm_memory_used_bytes ")]
    return int(float(line.split()[1]))


def _slot_bytes(srv: ApcmServer) -> int:
    codec = srv.service.codec
    return MemoryBank.slot_bytes(codec.code_dim, codec.code_dtype)


@pytest.fixture
def text_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ApcmServer]]:
    started: list[ApcmServer] = []

    def make(**overrides: object) -> ApcmServer:
        srv = start_text_server(tmp_path_factory.mktemp("text-limit"), **overrides)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(grace=0.5)


def test_metadata_only_writes_are_refused_at_the_memory_limit(
    text_servers: Callable[..., ApcmServer]
) -> None:
    limit = 1_000_000
    srv = text_servers(memory_limit_bytes=limit)
    with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
        c.create_bank("meta", 2000)
        refused = None
        for batch in range(40):  # ~5 KB of metadata each: 40 x 50 would be ~10 MB
            try:
                c.remember([f"m{batch}-{i}" for i in range(50)], bank="meta",
                           metadata=BIG_METADATA)
            except LimitExceededError as e:
                refused = e
                break
        assert refused is not None, f"never refused; {_used_bytes(srv)} bytes accounted"
        assert refused.limit == "memory_limit_bytes"
        assert "metadata" in refused.message
    assert _used_bytes(srv) <= limit


def test_the_lexical_index_counts_in_memory_bytes_and_the_limit(
    text_servers: Callable[..., ApcmServer]
) -> None:
    srv = text_servers()
    texts = [f"note {i}: the quarterly report about project number {i} is due" for i in
             range(200)]
    text_bytes = sum(len(t.encode()) for t in texts)
    with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
        c.create_bank("lex", 256)
        empty = _used_bytes(srv)
        before = c.describe_bank("lex").memory_bytes
        c.remember(texts, bank="lex")
        c.recall("quarterly report", bank="lex", mode="lexical")  # builds the BM25 index
        grown = c.describe_bank("lex").memory_bytes - before
    # the index keeps its own copy of each text, plus token ids and the BM25 matrix
    assert grown > text_bytes, grown
    # the limit counts the payloads (the texts) and the index on top of them
    assert _used_bytes(srv) - empty > 2 * text_bytes


def test_ivf_lists_count_in_the_memory_limit(
    make_server: Callable[..., ApcmServer], digits: np.ndarray
) -> None:
    srv = make_server(index_threshold=128)
    with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
        c.create_bank("ivf", 1024)
        c.write(digits[:400], bank="ivf", mode="per_item")
        deadline = time.monotonic() + 60
        while c.describe_bank("ivf").index.state != "ready":
            assert time.monotonic() < deadline, "the index was never built"
            time.sleep(0.1)
    index = srv.service.store.get("ivf").index
    assert index is not None
    reserved = (1024 + 64) * _slot_bytes(srv)  # "ivf" and the default bank, no keys/payloads
    assert _used_bytes(srv) == reserved + index.nbytes()
