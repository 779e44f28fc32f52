"""The memory browser: its JSON API over HTTP, and the page in a real headless
Chromium (Debian's ``chromium``, driven by Playwright) against real servers on
port 0 serving the shipped text model, with API keys off and on.

The Chromium tests skip, saying why, when Playwright or a Chromium binary is
missing; ``.ci/run`` installs Debian's package. The first of them saves the
screenshot the docs show (docs/memory-browser.png).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import start_text_server

from apcm.client import MemoryClient
from apcm.server.api.app import ApcmServer

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "memory-browser.png"
RW, RO = "browser-rw-key-0123456789abcdef", "browser-ro-key-0123456789abcdef"
FACTS = {
    "colour": ("The user's favourite colour is teal.", {"user": "alice"}),
    "allergy": ("Alice is allergic to peanuts and shellfish.", {"user": "alice"}),
    "deploy": ("The deployment runs on three Kubernetes nodes in Frankfurt.", {"team": "ops"}),
    "cat": ("Our office cat is called Miso and sleeps on the printer.", {}),
    "vpn": ("The VPN password rotates monthly.", {"team": "ops"}),
}


def _start(tmp: Path, **overrides: Any) -> ApcmServer:
    return start_text_server(tmp, default_bank_capacity=64, browser="on", browser_port=0,
                             **overrides)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = _start(tmp_path_factory.mktemp("browser-open"))
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    srv = _start(tmp_path_factory.mktemp("browser-keyed"), api_keys=RW, read_only_api_keys=RO)
    yield srv
    srv.stop(grace=0.5)


def _fill(srv: ApcmServer, bank: str, api_key: str | None = None) -> MemoryClient:
    client = MemoryClient(f"127.0.0.1:{srv.port}", timeout=60, api_key=api_key)
    client.create_bank(bank, 32, exist_ok=True)
    client.clear_bank(bank)
    client.remember([t for t, _ in FACTS.values()], bank=bank, keys=list(FACTS),
                    metadata=[m for _, m in FACTS.values()])
    return client


def _call(srv: ApcmServer, path: str, body: Any = None, key: str | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{srv.browser_port}{path}",
                                     headers=dict(headers or {}))
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.data = json.dumps(body).encode()
        if not request.has_header("Content-type"):
            request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------- the JSON API


def test_api_lists_pages_searches_and_deletes(open_server: ApcmServer) -> None:
    client = _fill(open_server, "api")
    status, info = _call(open_server, "/api/info")
    assert status == 200 and info["health"] == "SERVING" and info["keys"] is False
    assert info["model"]["name"] == "text-minilm" and info["model"]["code_dim"] == 192
    banks = {b["name"]: b for b in _call(open_server, "/api/banks")[1]}
    assert banks["api"]["memories"] == len(FACTS) and banks["api"]["capacity"] == 32

    first = _call(open_server, "/api/banks/api/memories?offset=0&limit=2")[1]
    rest = _call(open_server, "/api/banks/api/memories?offset=2&limit=10")[1]
    assert first["total"] == rest["total"] == len(FACTS)
    listed = first["memories"] + rest["memories"]
    assert [m["key"] for m in listed] == list(reversed(FACTS))  # newest first
    assert listed[0]["text"] == FACTS["vpn"][0] and listed[0]["metadata"] == {"team": "ops"}

    found = _call(open_server, "/api/banks/api/search?q=peanut%20allergy&mode=hybrid")[1]
    top = found["hits"][0]
    assert top["key"] == "allergy" and top["dense"] > 0.5 and top["lexical"] > 0
    assert top["fused"] >= max(h["fused"] for h in found["hits"])
    dense = _call(open_server, "/api/banks/api/search?q=peanut%20allergy&mode=dense")[1]
    assert dense["hits"][0]["lexical"] == 0.0
    assert dense["hits"][0]["fused"] == dense["hits"][0]["dense"]

    gone = next(m for m in listed if m["key"] == "cat")
    assert _call(open_server, "/api/banks/api/delete", gone) == (200, {"deleted": 1})
    assert _call(open_server, "/api/banks/api/delete", gone) == (200, {"deleted": 0})
    assert client.describe_bank("api").occupied == len(FACTS) - 1
    client.close()


def test_api_edits_metadata_of_the_memory_shown_only(open_server: ApcmServer) -> None:
    client = _fill(open_server, "labels")
    shown = next(m for m in _call(open_server, "/api/banks/labels/memories")[1]["memories"]
                 if m["key"] == "colour")
    edit = {"slot": shown["slot"], "sequence": shown["sequence"],
            "metadata": {"user": "bob", "kind": "preference"}}
    assert _call(open_server, "/api/banks/labels/metadata", edit) == (200, {"updated": True})
    [hit] = client.recall("favourite colour", bank="labels", top_k=1,
                          filter={"user": "bob"})
    assert (hit.key, hit.metadata) == ("colour", {"user": "bob", "kind": "preference"})
    assert client.recall("favourite colour", bank="labels", filter={"user": "alice"},
                         top_k=5, min_score=-1)[0].key == "allergy"  # alice lost colour
    client.remember("The user's favourite colour is now green.", bank="labels",
                    keys=["colour"])  # rewritten in place: a newer memory in that slot
    assert _call(open_server, "/api/banks/labels/metadata", edit) == (200, {"updated": False})
    status, body = _call(open_server, "/api/banks/labels/metadata",
                         {**edit, "metadata": {f"k{i}": "v" for i in range(17)}})
    assert status == 400 and "at most 16" in body["error"]
    client.close()


def test_api_refuses_what_a_page_elsewhere_could_abuse(open_server: ApcmServer) -> None:
    client = _fill(open_server, "guard")
    memory = _call(open_server, "/api/banks/guard/memories")[1]["memories"][0]
    status, body = _call(open_server, "/api/banks/guard/delete", memory,
                         headers={"Content-Type": "text/plain"})
    assert (status, body["error"]) == (400, "send the body as application/json")
    status, _ = _call(open_server, "/api/banks", headers={"Host": "evil.example:80"})
    assert status == 403
    assert _call(open_server, "/api/banks/nope/memories")[0] == 404
    assert _call(open_server, "/api/banks/guard/memories?limit=0") == (
        400, {"error": "limit must be in [1, 200], got 0"})
    assert client.describe_bank("guard").occupied == len(FACTS)
    client.close()


def test_api_keys_gate_reading_and_deleting(keyed_server: ApcmServer) -> None:
    client = _fill(keyed_server, "keyed", api_key=RW)
    with urllib.request.urlopen(f"http://127.0.0.1:{keyed_server.browser_port}/") as page:
        assert page.status == 200 and b"ApCM memory browser" in page.read()
    assert _call(keyed_server, "/api/banks")[0] == 401
    assert _call(keyed_server, "/api/banks", key="wrong")[0] == 401
    assert _call(keyed_server, "/api/info", key=RO)[1]["keys"] is True
    memory = _call(keyed_server, "/api/banks/keyed/memories", key=RO)[1]["memories"][0]
    status, body = _call(keyed_server, "/api/banks/keyed/delete", memory, key=RO)
    assert (status, body["error"]) == (403, "a read-only API key cannot change memories")
    status, _ = _call(keyed_server, "/api/banks/keyed/metadata",
                      {**memory, "metadata": {}}, key=RO)
    assert status == 403
    assert _call(keyed_server, "/api/banks/keyed/delete", memory, key=RW) == (
        200, {"deleted": 1})
    assert client.describe_bank("keyed").occupied == len(FACTS) - 1
    client.close()


# ---------------------------------------------------------------- in Chromium


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                        "(pip install -e '.[dev]')")
    for name in (os.environ.get("APCM_CHROMIUM", ""), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    pytest.skip("no Chromium binary (apt-get install chromium, or set APCM_CHROMIUM)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _page(browser: Any, srv: ApcmServer) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept() if dialog.type == "confirm" else None)
    page.goto(f"http://127.0.0.1:{srv.browser_port}/")
    return page


def test_page_loads_searches_and_deletes(browser: Any, open_server: ApcmServer) -> None:
    client = _fill(open_server, "agent-notes")
    page = _page(browser, open_server)
    page.wait_for_selector("#health.SERVING")
    assert page.inner_text("#model").count("text-minilm") == 1
    page.click("#banks tr[data-bank='agent-notes']")
    page.wait_for_selector("#memories tbody tr")
    assert page.inner_text("#summary") == f"{len(FACTS)} memories, newest first"
    assert page.locator("#memories tbody tr").first.inner_text().startswith(FACTS["vpn"][0])

    page.fill("#query", "What must not go into Alice's dinner?")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#summary:has-text('hits for')")
    headers = page.locator("#memories thead th").all_inner_texts()
    assert headers[3:6] == ["dense (cosine)", "lexical (BM25)", "fused"]
    top = page.locator("#memories tbody tr").first.locator("td").all_inner_texts()
    assert top[0] == FACTS["allergy"][0] and top[2] == "user=alice"
    assert float(top[3]) > 0.5
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.once("dialog", lambda dialog: dialog.accept("user=alice, severity=high"))
    page.locator("#memories tbody tr").first.locator("button.edit").click()
    expect(page.locator("#memories tbody tr").first).to_contain_text("severity=high")
    assert client.recall("allergy", bank="agent-notes", top_k=1,
                         filter={"severity": "high"})[0].key == "allergy"

    page.locator("#memories tbody tr").first.locator("button.delete").click()
    expect(page.locator("#memories")).not_to_contain_text("allergic")
    assert "allergy" not in {h.key for h in client.recall("Alice", bank="agent-notes",
                                                          top_k=10, min_score=-1)}
    assert client.describe_bank("agent-notes").occupied == len(FACTS) - 1
    page.close()
    client.close()


def test_page_asks_for_a_key_and_a_read_only_key_cannot_delete(
        browser: Any, keyed_server: ApcmServer) -> None:
    client = _fill(keyed_server, "keyed-page", api_key=RW)
    page = _page(browser, keyed_server)
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#error")
    page.fill("#key", "wrong")
    page.click("#key-form button")
    page.wait_for_selector("#error:has-text('needs an API key')")

    page.fill("#key", RO)
    page.click("#key-form button")
    page.wait_for_selector("#banks tr[data-bank='keyed-page']")
    assert page.is_hidden("#error")
    page.click("#banks tr[data-bank='keyed-page']")
    page.wait_for_selector("#memories tbody tr")
    page.locator("#memories tbody tr").first.locator("button.delete").click()
    page.wait_for_selector("#error:has-text('read-only API key cannot change')")
    assert client.describe_bank("keyed-page").occupied == len(FACTS)

    page.fill("#key", RW)  # the key form stays: switch to a read-write key
    page.click("#key-form button")
    page.wait_for_selector("#banks tr[data-bank='keyed-page']")
    page.click("#banks tr[data-bank='keyed-page']")
    page.wait_for_selector("#memories tbody tr")
    page.locator("#memories tbody tr").first.locator("button.delete").click()
    expect(page.locator("#summary")).to_have_text(f"{len(FACTS) - 1} memories, newest first")
    assert client.describe_bank("keyed-page").occupied == len(FACTS) - 1
    page.close()
    client.close()
