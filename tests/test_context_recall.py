"""Context recall, the convex fusion and the bounds of a text request, end to end:
a real server with the shipped text model and its MiniLM embedder, the real client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import start_text_server

from apcm.client import (
    DeadlineExceededError,
    InvalidArgumentError,
    MemoryClient,
    ResourceExhaustedError,
)
from apcm.client.agent_mcp import AgentMemory
from apcm.server.api.app import ApcmServer
from apcm.server.domain import recall
from apcm.server.errors import DeadlineExceeded
from apcm.tools.bench.hybrid import load

# A conversation stored one turn per memory. The question paraphrases Melanie's
# question (turn "ask"); Caroline's answer (turn "answer") shares almost no word with it.
CHAT = [
    ("t0", "[3 May 2023] Melanie: Hey Caroline, how have you been?"),
    ("t1", "[3 May 2023] Caroline: Busy! Work has been hectic lately."),
    ("t2", "[3 May 2023] Melanie: I keep saying I'll take a real vacation, but never do."),
    ("t3", "[3 May 2023] Caroline: You should, everyone needs a break."),
    ("ask", "[3 May 2023] Melanie: Caroline, where did you go on your vacation in April?"),
    ("answer", "[3 May 2023] Caroline: Lisbon! We stayed nearly two weeks."),
    ("t6", "[3 May 2023] Melanie: The weather here has been awful, rain every day."),
    ("t7", "[3 May 2023] Caroline: My sister visited, it was lovely to catch up."),
    ("t8", "[3 May 2023] Melanie: Caroline, did you ever finish painting the kitchen?"),
    ("t9", "[3 May 2023] Caroline: Not yet, the vacation got in the way of everything."),
    ("t10", "[3 May 2023] Melanie: My vacation plans for the summer fell through again."),
    ("t11", "[3 May 2023] Caroline: Traffic this morning was unbelievable."),
    ("t12", "[3 May 2023] Melanie: I'm trying to eat healthier, lots of salads."),
    ("t13", "[3 May 2023] Caroline: Honestly I just needed a quiet weekend at home."),
]
QUESTION = "Where did Caroline go on vacation in April?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = start_text_server(tmp_path_factory.mktemp("context-data"),
                            max_request_text_bytes=65_536)
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture
def mem(server: ApcmServer) -> Iterator[MemoryClient]:
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=120.0) as c:
        yield c


def _chat(mem: MemoryClient, bank: str, context: int = 0) -> None:
    mem.create_bank(bank, 64, exist_ok=True, context=context)
    mem.remember([t for _, t in CHAT], bank=bank, keys=[k for k, _ in CHAT])


def test_the_answer_turn_is_found_only_with_context(mem: MemoryClient) -> None:
    _chat(mem, "chat")
    off = mem.recall(QUESTION, bank="chat", top_k=3)
    assert "answer" not in [h.key for h in off]
    assert off[0].key == "ask" and off[0].context == ()
    on = mem.recall(QUESTION, bank="chat", top_k=3, context=1)
    keys = [h.key for h in on]
    assert "answer" in keys and keys[0] == "ask", keys
    ask = on[0]  # the exchange comes with the hit: the turn before and the one after
    assert [(c.offset, c.key) for c in ask.context] == [(-1, "t3"), (1, "answer")]
    assert ask.context[1].text.endswith("Lisbon! We stayed nearly two weeks.")
    answer = on[keys.index("answer")]
    assert [(c.offset, c.key) for c in answer.context] == [(-1, "ask"), (1, "t6")]
    # the bank's setting is the default of its reads; a call's 0 turns it off
    _chat(mem, "chat-on", context=1)
    assert mem.describe_bank("chat-on").context == 1
    assert [h.key for h in mem.recall(QUESTION, bank="chat-on", top_k=3)] == keys
    assert [h.key for h in mem.recall(QUESTION, bank="chat-on", top_k=3, context=0)] == \
        [h.key for h in off]


def test_context_follows_threads_and_filters(mem: MemoryClient) -> None:
    """Two sessions written interleaved: each memory's neighbours are its session's,
    and a filter restricts the neighbours too."""
    mem.create_bank("threads", 64, exist_ok=True)
    for i, (key, text) in enumerate(CHAT):
        mem.remember([text, f"[4 May 2023] Bob: unrelated line number {i}."], bank="threads",
                     keys=[key, f"bob{i}"],
                     metadata=[{"session": "s1", "user": "mc"}, {"session": "s2"}])
    hits = mem.recall(QUESTION, bank="threads", top_k=3, context=1)
    assert hits[0].key == "ask"
    assert [c.key for c in hits[0].context] == ["t3", "answer"]
    bob = mem.recall("unrelated line number 5", bank="threads", top_k=1, context=2,
                     mode="lexical")
    assert [c.key for c in bob[0].context] == ["bob3", "bob4", "bob6", "bob7"]
    only = mem.recall(QUESTION, bank="threads", top_k=5, context=1, filter={"user": "mc"})
    assert all(not h.key.startswith("bob") for h in only)
    assert all(not c.key.startswith("bob") for h in only for c in h.context)
    # a thread key overrides the session
    mem.create_bank("thread-key", 16, exist_ok=True)
    mem.remember(["alpha one", "beta one", "alpha two"], bank="thread-key",
                 keys=["a1", "b1", "a2"],
                 metadata=[{"thread": "a", "session": "x"}, {"session": "x"},
                           {"thread": "a", "session": "x"}])
    hit = mem.recall("alpha two", bank="thread-key", top_k=1, context=1, mode="lexical")[0]
    assert hit.key == "a2" and [c.key for c in hit.context] == ["a1"]


def test_exact_copies_come_first(mem: MemoryClient) -> None:
    """A stored text recalled with its own wording is the first hit (hybrid default)."""
    data = load()
    memories = [m for m in data["memories"] if m["session"] in ("sed", "procps")]
    mem.create_bank("copies", len(memories), exist_ok=True)
    for i in range(0, len(memories), 32):
        part = memories[i:i + 32]
        mem.remember([m["text"] for m in part], bank="copies", keys=[str(m["id"]) for m in part])
    picked = memories[::max(1, len(memories) // 60)][:60]
    same = {m["id"]: {str(x["id"]) for x in memories if x["text"] == m["text"]} for m in picked}
    firsts = mem.recall([m["text"] for m in picked], bank="copies", top_k=1)
    found = sum(hits[0].key in same[m["id"]] for m, hits in zip(picked, firsts, strict=True))
    assert found == len(picked)


def test_convex_is_the_default_and_rrf_a_mode(mem: MemoryClient) -> None:
    mem.create_bank("fusions", 16, exist_ok=True)
    mem.remember(["The spare key is under the blue flowerpot.",
                  "Zebra crossings are striped black and white."], bank="fusions")
    convex = mem.recall("where is the spare key?", bank="fusions", top_k=2)
    assert convex[0].text.startswith("The spare key")
    assert convex[0].rank_score == pytest.approx(1.0)  # first in both, normalised
    assert convex[1].rank_score == pytest.approx(0.0)
    rrf = mem.recall("where is the spare key?", bank="fusions", top_k=2, fusion="rrf")
    assert rrf[0].rank_score == pytest.approx(2 / 61)
    with pytest.raises(InvalidArgumentError):
        mem.recall("x", bank="fusions", fusion="max")
    with pytest.raises(InvalidArgumentError):
        mem.recall("x", bank="fusions", context=9)


def test_text_fusion_is_exact_with_an_ivf_index(tmp_path: Path) -> None:
    """A bank big enough to be indexed recalls by hybrid and with context exactly as
    the same memories in a bank of a server that never indexes."""
    data = load()
    memories = [m for m in data["memories"] if m["session"] in ("sed", "valgrind")][:400]
    questions = [q["question"] for q in data["questions"] if q["session"] == "sed"][:24]

    def answers(threshold: int, data_dir: Path) -> tuple[str, list[list[tuple[str, float]]]]:
        srv = start_text_server(data_dir, index_threshold=threshold)
        try:
            with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
                c.create_bank("big", 512)
                for i in range(0, len(memories), 128):
                    part = memories[i:i + 128]
                    c.remember([m["text"] for m in part], bank="big",
                               keys=[str(m["id"]) for m in part])
                deadline = time.monotonic() + 120
                while threshold and c.describe_bank("big").index.state != "ready":
                    assert time.monotonic() < deadline, "the index was not built"
                    time.sleep(0.2)
                out = []
                for ctx in (0, 1):
                    for hits in c.recall(questions, bank="big", top_k=10, context=ctx):
                        out.append([(h.key, round(h.rank_score, 4)) for h in hits])
                return c.describe_bank("big").index.state, out
        finally:
            srv.stop(grace=0.5)

    state, indexed = answers(256, tmp_path / "indexed")
    assert state == "ready"
    state, scanned = answers(0, tmp_path / "scanned")
    assert state == "none"
    assert indexed == scanned


def test_counts_of_text_recalls_survive_a_snapshot(tmp_path: Path) -> None:
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("counted", 64, context=1)
            c.remember([t for _, t in CHAT], bank="counted", keys=[k for k, _ in CHAT])
            c.create_snapshot("before")
            for mode in ("hybrid", "lexical", "dense"):
                c.recall(QUESTION, bank="counted", top_k=3, mode=mode)
            c.recall(QUESTION, bank="counted", top_k=3, context=0)
            before = c.describe_bank("counted")
            assert before.reads_total == 4
            c.create_snapshot("after")  # incremental: only the counters changed
    finally:
        srv.stop(grace=0.5)
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            after = c.describe_bank("counted")
            assert after.reads_total == before.reads_total
            assert after.counter_max == pytest.approx(before.counter_max)
            assert after.context == 1  # the bank's setting is kept too
    finally:
        srv.stop(grace=0.5)


def test_a_request_s_text_is_bounded(mem: MemoryClient) -> None:
    """The server runs with max_request_text_bytes=65536: a larger Read or Write of
    texts is refused before any embedding, a smaller one is served."""
    mem.create_bank("bounded", 16, exist_ok=True)
    big = ["word " * 3000 + f"{i}" for i in range(5)]  # 15 kB each
    with pytest.raises(ResourceExhaustedError) as e:
        mem.recall(big, bank="bounded")
    assert "max_request_text_bytes" in str(e.value)
    with pytest.raises(ResourceExhaustedError):
        mem.remember(big, bank="bounded")
    assert mem.describe_bank("bounded").occupied == 0
    mem.remember(big[:3], bank="bounded")
    assert len(mem.recall(big[:3], bank="bounded")) == 3


def test_embedding_stops_when_the_deadline_passes(server: ApcmServer,
                                                  mem: MemoryClient) -> None:
    service = server.service
    with pytest.raises(DeadlineExceeded):
        service.embed(["a text"], deadline=time.monotonic() - 1)
    calls: list[int] = []

    def slow(texts: np.ndarray) -> np.ndarray:
        calls.append(len(texts))
        time.sleep(0.05)
        return np.zeros((len(texts), 4), dtype=np.float32)

    texts = ["t"] * (recall.EMBED_CHUNK * 10)
    with pytest.raises(DeadlineExceeded):
        recall.embed_in_chunks(slow, texts, time.monotonic() + 0.12)
    assert 1 <= len(calls) < 10  # the chunks after the deadline were never embedded
    # through the server: a deadline too short for the work is DEADLINE_EXCEEDED
    with pytest.raises(DeadlineExceededError):
        mem.recall([f"question {i}" for i in range(256)], timeout=0.01)


def test_mcp_recall_returns_the_exchange(server: ApcmServer, mem: MemoryClient) -> None:
    _chat(mem, "mcp-chat")
    tools = AgentMemory(mem, f"127.0.0.1:{server.port}")
    hits = tools.recall(QUESTION, bank="mcp-chat", top_k=1, context=1)
    assert hits[0]["key"] == "ask"
    assert hits[0]["after"][0].endswith("Lisbon! We stayed nearly two weeks.")
    assert "before" not in tools.recall(QUESTION, bank="mcp-chat", top_k=1)[0]
