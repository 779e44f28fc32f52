"""``apcm mcp``'s tools as a model meets them: a real ``apcm mcp`` process reached
with the official MCP SDK client over stdio and over streamable HTTP (and with the
MCP Inspector CLI when npx can run it), in front of a real ApCM server on port 0
that serves the shipped text model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import start_text_server

from apcm.client import MemoryClient
from apcm.server.api.app import ApcmServer

pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APCM = str(Path(sys.executable).with_name("apcm"))
TOKEN = "mcp-tools-token-0123456789abcdef0123456789"
FACTS = {
    "colour": "The user's favourite colour is teal.",
    "allergy": "Alice is allergic to peanuts and shellfish.",
    "deploy": "The deployment runs on three Kubernetes nodes in Frankfurt.",
    "cat": "Our office cat is called Miso and sleeps on the printer.",
}
TOOLS = {"remember", "recall", "forget", "create_bank", "list_banks"}


@pytest.fixture(scope="module")
def apcm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = start_text_server(tmp_path_factory.mktemp("mcp-data"), default_bank_capacity=64)
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture
def sdk(apcm: ApcmServer) -> Iterator[MemoryClient]:
    with MemoryClient(f"127.0.0.1:{apcm.port}", timeout=60.0) as c:
        yield c


def _facts_bank(sdk: MemoryClient, name: str, keyed: bool = True) -> None:
    sdk.create_bank(name, 16, exist_ok=True)
    sdk.clear_bank(name)
    sdk.remember(list(FACTS.values()), bank=name, keys=list(FACTS) if keyed else None)


def _stdio(apcm: ApcmServer, steps: Any) -> Any:
    params = StdioServerParameters(command=APCM, args=[
        "mcp", "--target", f"127.0.0.1:{apcm.port}", "--timeout", "30"])

    async def go() -> Any:
        async with Client(params) as client:
            return await steps(client)

    return asyncio.run(go())


def _ok(r: Any) -> Any:
    assert not r.is_error, r.content
    return r.structured_content.get("result", r.structured_content)


def _error(r: Any) -> str:
    assert r.is_error, r.structured_content
    text = r.content[0].text
    assert "pydantic" not in text and "http" not in text, text
    return str(text)


def check_schemas(tools: dict[str, dict[str, Any]]) -> None:
    """Every argument described and bounded as the server bounds it; hints set."""
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool["description"] and "Args:" not in tool["description"], name
        for arg, prop in tool["inputSchema"]["properties"].items():
            assert prop.get("description"), (name, arg)
    props = {n: t["inputSchema"]["properties"] for n, t in tools.items()}
    assert props["recall"]["top_k"]["minimum"] == 1 and props["recall"]["top_k"]["maximum"] == 50
    assert props["recall"]["min_score"]["default"] == 0.35
    assert props["remember"]["text"]["maxLength"] == 16_384
    metadata = props["remember"]["metadata"]["anyOf"][0]
    assert metadata["maxProperties"] == 16
    assert metadata["propertyNames"]["maxLength"] == 64
    assert metadata["additionalProperties"]["maxLength"] == 256
    assert props["remember"]["key"]["anyOf"][0]["maxLength"] == 256
    assert props["forget"]["confirm"]["default"] is False
    assert props["create_bank"]["name"]["maxLength"] == 64
    hints = {n: t["annotations"] for n, t in tools.items()}
    assert hints["recall"]["readOnlyHint"] and hints["list_banks"]["readOnlyHint"]
    assert hints["forget"]["destructiveHint"] and hints["forget"]["idempotentHint"]
    assert not hints["forget"]["readOnlyHint"] and not hints["remember"]["readOnlyHint"]
    assert hints["create_bank"]["destructiveHint"] is False
    assert hints["create_bank"]["idempotentHint"]


def _tool_dicts(listed: Any) -> dict[str, dict[str, Any]]:
    return {t.name: t.model_dump(by_alias=True, exclude_none=True) for t in listed.tools}


def test_schemas_describe_and_bound_every_argument(apcm: ApcmServer) -> None:
    async def steps(c: Any) -> Any:
        return _tool_dicts(await c.list_tools())

    check_schemas(_stdio(apcm, steps))


def test_bad_arguments_get_one_sentence_naming_the_fix(apcm: ApcmServer) -> None:
    async def steps(c: Any) -> list[str]:
        return [_error(await c.call_tool(name, args)) for name, args in (
            ("recall", {"query": "jazz", "top_k": 1000}),
            ("remember", {"text": "x" * 16_385}),
            ("remember", {"text": "ok", "metadata": {f"k{i}": "v" for i in range(17)}}),
            ("recall", {}),
            ("forget", {"id": "slot seven", "confirm": True}),
            ("create_bank", {"name": "../etc"}),
        )]

    top_k, long_text, metadata, missing, bad_id, bad_name = _stdio(apcm, steps)
    assert top_k == ("Invalid arguments for recall: `top_k` must be at most 50 (got 1000). "
                     "Fix them and call recall again.")
    assert "`text` must be at most 16384 characters (got 16385)" in long_text
    assert "`metadata` may have at most 16 entries" in metadata
    assert "`query` is required" in missing
    assert "`id` has the wrong form" in bad_id
    assert "`name` has the wrong form" in bad_name
    for sentence in (top_k, long_text, metadata, missing, bad_id, bad_name):
        assert sentence.count("\n") == 0 and sentence.endswith("again."), sentence


def test_recall_drops_noise_and_shows_similarity(apcm: ApcmServer, sdk: MemoryClient) -> None:
    _facts_bank(sdk, "mcp-recall")

    async def steps(c: Any) -> list[Any]:
        return [_ok(await c.call_tool("recall", args)) for args in (
            {"query": "jazz", "bank": "mcp-recall"},
            {"query": "qwxz zzkv plorb", "bank": "mcp-recall"},
            {"query": "What must not go into Alice's dinner?", "bank": "mcp-recall"},
            {"query": "jazz", "bank": "mcp-recall", "min_score": -1.0, "top_k": 50},
        )]

    jazz, nonsense, dinner, everything = _stdio(apcm, steps)
    assert jazz == [] and nonsense == []
    assert [h["key"] for h in dinner] == ["allergy"]
    assert dinner[0]["similarity"] >= 0.35 and dinner[0]["text"] == FACTS["allergy"]
    assert len(everything) == len(FACTS)  # lowered on purpose: weak matches come back
    assert all(h["similarity"] < 0.35 for h in everything)


def test_forget_by_nonsense_query_deletes_nothing(apcm: ApcmServer, sdk: MemoryClient) -> None:
    _facts_bank(sdk, "mcp-nonsense", keyed=False)

    async def steps(c: Any) -> list[Any]:
        return [await c.call_tool("forget", {"query": q, "bank": "mcp-nonsense",
                                             "confirm": True})
                for q in ("qwxz zzkv plorb", "jazz", "What colour does the user like?")]

    results = _stdio(apcm, steps)
    for r in results:
        assert "nothing was deleted" in _error(r)
    assert "forget it by its id" in results[2].content[0].text  # candidates with ids
    assert sdk.describe_bank("mcp-nonsense").occupied == len(FACTS)
    assert sdk.recall("teal colour", bank="mcp-nonsense", top_k=1)[0].text == FACTS["colour"]


def test_forget_shows_first_and_deletes_only_with_confirm(apcm: ApcmServer,
                                                          sdk: MemoryClient) -> None:
    _facts_bank(sdk, "mcp-forget")
    restated = "Alice is allergic to peanuts and shellfish"

    async def steps(c: Any) -> dict[str, Any]:
        out = {"preview": _ok(await c.call_tool("forget", {"query": restated,
                                                           "bank": "mcp-forget"}))}
        out["occupied"] = sdk.describe_bank("mcp-forget").occupied
        out["deleted"] = _ok(await c.call_tool("forget", {"query": restated,
                                                          "bank": "mcp-forget",
                                                          "confirm": True}))
        out["key_preview"] = _ok(await c.call_tool("forget", {"key": "cat",
                                                              "bank": "mcp-forget"}))
        out["key_deleted"] = _ok(await c.call_tool("forget", {"key": "cat",
                                                              "bank": "mcp-forget",
                                                              "confirm": True}))
        out["key_again"] = await c.call_tool("forget", {"key": "cat", "bank": "mcp-forget",
                                                        "confirm": True})
        out["neither"] = await c.call_tool("forget", {"bank": "mcp-forget"})
        return out

    out = _stdio(apcm, steps)
    preview = out["preview"]
    assert preview["deleted"] == 0 and out["occupied"] == len(FACTS)
    [shown] = preview["would_delete"]
    assert shown["key"] == "allergy" and shown["similarity"] >= 0.7
    assert f"id={shown['id']!r} and confirm=true" in preview["next"]
    assert out["deleted"]["deleted"] == 1 and out["deleted"]["memories"][0]["key"] == "allergy"
    assert out["key_preview"]["deleted"] == 0
    assert out["key_preview"]["would_delete"] == [{"key": "cat"}]
    assert out["key_deleted"] == {"deleted": 1, "memories": [{"key": "cat"}]}
    assert "No memory has the key 'cat'" in _error(out["key_again"])
    assert "exactly one of `key`" in _error(out["neither"])
    left = {h.key for h in sdk.recall("anything", bank="mcp-forget", top_k=10, min_score=-1)}
    assert left == {"colour", "deploy"}


def test_forget_by_id_spares_a_memory_written_into_the_slot_since(
        apcm: ApcmServer, sdk: MemoryClient) -> None:
    """The id a recall showed names (slot, write sequence): when a concurrent write
    reuses the slot before the model confirms, forget deletes nothing."""
    _facts_bank(sdk, "mcp-race", keyed=False)

    async def steps(c: Any) -> dict[str, Any]:
        [hit] = _ok(await c.call_tool("recall", {"query": "What is the office cat called?",
                                                 "bank": "mcp-race", "top_k": 1}))
        slot = int(hit["id"].split(":")[0])
        # another agent deletes the memory and writes a new one, which lands in its slot
        sdk.delete_slots("mcp-race", slots=[slot])
        newer = sdk.remember("Bob takes his coffee black.", bank="mcp-race")[0]
        assert newer.slot == slot
        return {"hit": hit, "preview": await c.call_tool("forget", {
            "id": hit["id"], "bank": "mcp-race"}), "confirmed": await c.call_tool("forget", {
                "id": hit["id"], "bank": "mcp-race", "confirm": True})}

    out = _stdio(apcm, steps)
    assert out["hit"]["text"] == FACTS["cat"]
    for r in (out["preview"], out["confirmed"]):
        assert "is no longer there" in _error(r)
    assert sdk.describe_bank("mcp-race").occupied == len(FACTS)
    assert sdk.recall("coffee", bank="mcp-race", top_k=1)[0].text == "Bob takes his coffee black."


def test_create_bank_then_remember_into_it(apcm: ApcmServer, sdk: MemoryClient) -> None:
    async def steps(c: Any) -> list[Any]:
        return [_ok(await c.call_tool("create_bank", {"name": "mcp-made", "capacity": 8})),
                _ok(await c.call_tool("create_bank", {"name": "mcp-made", "capacity": 99})),
                _ok(await c.call_tool("remember", {"text": "Eve speaks Japanese.",
                                                   "bank": "mcp-made", "key": "eve"})),
                _ok(await c.call_tool("list_banks", {}))]

    made, again, stored, banks = _stdio(apcm, steps)
    assert made == {"created": True, "name": "mcp-made", "capacity": 8, "memories": 0}
    assert again == {"created": False, "name": "mcp-made", "capacity": 8, "memories": 0}
    assert stored["key"] == "eve" and stored["stored"] is True
    assert {"name": "mcp-made", "memories": 1, "capacity": 8} in banks
    assert sdk.describe_bank("mcp-made").occupied == 1


# ---------------------------------------------------------------- streamable HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mcp_url(apcm: ApcmServer) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "APCM_MCP_TOKEN": TOKEN}
    proc = subprocess.Popen([APCM, "mcp", "--target", f"127.0.0.1:{apcm.port}", "--transport",
                             "http", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "apcm mcp --transport http did not listen"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.communicate(timeout=30)


def test_http_serves_the_same_tools_and_guards(mcp_url: str, sdk: MemoryClient) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    _facts_bank(sdk, "mcp-http", keyed=False)

    async def go() -> Any:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        async with http, Client(streamable_http_client(mcp_url, http_client=http)) as c:
            return (_tool_dicts(await c.list_tools()),
                    await c.call_tool("recall", {"query": "jazz", "top_k": 1000}),
                    await c.call_tool("forget", {"query": "qwxz zzkv plorb",
                                                 "bank": "mcp-http", "confirm": True}),
                    await c.call_tool("recall", {"query": "jazz", "bank": "mcp-http"}))

    tools, too_many, nonsense, jazz = asyncio.run(go())
    check_schemas(tools)
    assert "`top_k` must be at most 50 (got 1000)" in _error(too_many)
    assert "nothing was deleted" in _error(nonsense)
    assert _ok(jazz) == []
    assert sdk.describe_bank("mcp-http").occupied == len(FACTS)


# ---------------------------------------------------------------- MCP Inspector CLI

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


def _inspector(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed (Node.js), so the MCP Inspector CLI cannot run")
    try:
        done = subprocess.run(["npx", "-y", INSPECTOR, "--cli", *args], capture_output=True,
                              text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npx could not fetch and start {INSPECTOR} within 240 s")
    if done.returncode != 0 and ("ENOTFOUND" in done.stderr or "E404" in done.stderr
                                 or "EAI_AGAIN" in done.stderr or "ECONNREFUSED" in done.stderr):
        pytest.skip(f"npx could not fetch {INSPECTOR} from the npm registry: "
                    f"{done.stderr.strip().splitlines()[-1]}")
    return done


def test_inspector_cli_lists_portable_schemas(apcm: ApcmServer) -> None:
    done = _inspector(APCM, "mcp", "--target", f"127.0.0.1:{apcm.port}",
                      "--method", "tools/list", "--strict")
    assert done.returncode == 0, done.stderr
    check_schemas({t["name"]: t for t in json.loads(done.stdout)["tools"]})


def test_inspector_cli_calls_recall_over_http(mcp_url: str) -> None:
    done = _inspector(mcp_url, "--header", f"Authorization: Bearer {TOKEN}",
                      "--method", "tools/call", "--tool-name", "recall",
                      "--tool-arg", "query=jazz", "top_k=1000")
    result = json.loads(done.stdout)
    assert result["isError"] is True, result
    assert "`top_k` must be at most 50 (got 1000)" in result["content"][0]["text"]
