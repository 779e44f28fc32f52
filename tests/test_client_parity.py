"""The blocking and asyncio clients are one API: same methods, signatures and docs,
and the same results for the same calls against one real server.

The round trip runs on the shipped text model, so that vectors (``write``,
``read``) and texts (``remember``, ``recall``) go through the same server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TEXT_MODEL, server_settings
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file

from apcm.client import ApcmError, AsyncMemoryClient, MemoryClient, WrittenSlots
from apcm.server.api.app import ApcmServer, build_server

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "text_heldout.safetensors"
BANK = "parity"
FACTS = [
    "Carol's birthday is on 12 May.",
    "Carol is vegetarian.",
    "The VPN password rotates monthly.",
    "Standup moved to 9:30.",
]
# Numbered by the server across all banks (write-ahead log order) or by the clock:
# the second run cannot repeat them, whichever client makes it.
VOLATILE_FIELDS = {"sequence", "wal_sequence", "created_at"}


# ------------------------------------------------------------------ the API surface


def _public(cls: type) -> dict[str, Any]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


def _methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {name: value for name, value in _public(cls).items() if callable(value)}


def test_both_clients_expose_the_same_public_names() -> None:
    assert set(_public(MemoryClient)) == set(_public(AsyncMemoryClient))
    sync, aio = MemoryClient("127.0.0.1:1"), AsyncMemoryClient("127.0.0.1:1")
    try:
        assert {k for k in vars(sync) if not k.startswith("_")} == {
            k for k in vars(aio) if not k.startswith("_")}
    finally:
        sync.close()


@pytest.mark.parametrize("name", sorted(_methods(MemoryClient)))
def test_method_has_one_signature_and_one_docstring(name: str) -> None:
    sync, aio = getattr(MemoryClient, name), getattr(AsyncMemoryClient, name)
    assert not inspect.iscoroutinefunction(sync)
    assert inspect.iscoroutinefunction(aio), f"AsyncMemoryClient.{name} is not async"
    assert inspect.signature(sync) == inspect.signature(aio)
    doc = inspect.getdoc(sync)
    assert doc, f"{name} has no docstring"
    assert inspect.getdoc(aio) == doc
    # one text serves both clients, so it must not point from one to the other
    assert "MemoryClient" not in doc


def test_constructors_differ_only_by_direct_routing() -> None:
    """``routing="direct"`` is blocking-only: the router opens blocking peer channels."""
    sync = inspect.signature(MemoryClient.__init__).parameters
    aio = inspect.signature(AsyncMemoryClient.__init__).parameters
    assert [p for name, p in sync.items() if name != "routing"] == list(aio.values())


def test_context_managers_match_their_kind() -> None:
    assert callable(MemoryClient.__enter__) and callable(MemoryClient.__exit__)
    assert inspect.iscoroutinefunction(AsyncMemoryClient.__aenter__)
    assert inspect.iscoroutinefunction(AsyncMemoryClient.__aexit__)


# ------------------------------------------------------------------ the same calls, both ways


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    settings = server_settings(TEXT_MODEL, tmp_path_factory.mktemp("parity-data"),
                               default_bank_capacity=16)
    srv, _ = build_server(settings, registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(grace=0.5)


def _plain(value: Any) -> Any:
    """A result as comparable plain data: arrays by dtype, shape and bytes; volatile fields out."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, WrittenSlots):
        return ("WrittenSlots", [_plain(v) for v in value], _plain(value.checks))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, {f.name: _plain(getattr(value, f.name))
                                       for f in dataclasses.fields(value)
                                       if f.name not in VOLATILE_FIELDS})
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # NamedTuple results
        return (type(value).__name__, {k: _plain(v) for k, v in value._asdict().items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_plain(v) for v in value])
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _script(call: Callable[..., Any], x: np.ndarray) -> dict[str, Any]:
    """The same calls through either client; ``call(name, *args, **kwargs)`` runs one."""
    out: dict[str, Any] = {}

    def step(label: str, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = call(name, *args, **kwargs)
        except ApcmError as err:
            out[label] = ("raised", type(err).__name__, err.code, err.message)
            return None
        out[label] = _plain(result)
        return result

    step("health", "health")
    step("model_info", "model_info")
    codes = step("compress", "compress", x)
    step("compress_checked", "compress_checked", x)
    step("decompress", "decompress", codes)
    step("create_bank", "create_bank", BANK, 16, policy="lfu_decay", half_life=50.0)
    step("create_bank again", "create_bank", BANK, 16)
    step("create_bank exist_ok", "create_bank", BANK, 16, exist_ok=True)
    step("write mean", "write", x, bank=BANK, payloads="all four", keys="all")
    step("write per_item", "write", x, bank=BANK, mode="per_item",
         payloads=[t.encode() for t in FACTS], keys=[f"v{i}" for i in range(len(FACTS))])
    step("write codes keyless", "write", codes=codes[:1], bank=BANK, mode="per_item")
    step("write bad mode", "write", x, bank=BANK, mode="sum")
    step("write both", "write", x, codes=codes, bank=BANK)
    step("read", "read", x[:2], bank=BANK, top_k=3, payloads=True, reconstruct=True, soft=True)
    step("read codes", "read", codes=codes[1:2], bank=BANK, top_k=2, temperature=0.5,
         min_score=0.1, count_access=False, exhaustive=True)
    step("read top_k 0", "read", x[:1], bank=BANK, top_k=0)
    step("remember", "remember", FACTS, bank=BANK, keys=[f"t{i}" for i in range(len(FACTS))],
         metadata=[{"user": f"u{i % 2}"} for i in range(len(FACTS))])
    step("remember one", "remember", "The office cat is called Miso.", BANK)
    step("recall", "recall", "When is Carol's birthday?", bank=BANK, top_k=2)
    step("recall many filtered", "recall", ["what does Carol eat", "when is standup"],
         bank=BANK, top_k=1, filter={"user": "u1"}, mode="dense")
    step("recall lexical", "recall", "VPN password", bank=BANK, top_k=1, mode="lexical")
    step("recall bad mode", "recall", "anything", bank=BANK, mode="fuzzy")
    step("describe", "describe_bank", BANK)
    step("delete", "delete_slots", BANK, keys=["t0", "never-written"], slots=[0])
    step("describe after delete", "describe_bank", BANK)
    step("list_banks", "list_banks")
    step("list_snapshots", "list_snapshots")
    step("clear", "clear_bank", BANK)
    step("drop", "drop_bank", BANK)
    step("describe dropped", "describe_bank", BANK)
    return out


def test_both_clients_return_equal_results_for_the_same_calls(text_server: ApcmServer) -> None:
    address = f"127.0.0.1:{text_server.port}"
    x = load_file(str(FIXTURE))["test"][:4]  # [4, 1, 384] MiniLM embeddings

    with MemoryClient(address, timeout=60.0) as client:
        blocking = _script(lambda name, *a, **k: getattr(client, name)(*a, **k), x)

    loop = asyncio.new_event_loop()
    aclient = AsyncMemoryClient(address, timeout=60.0)
    try:
        asynchronous = _script(
            lambda name, *a, **k: loop.run_until_complete(getattr(aclient, name)(*a, **k)), x)
    finally:
        loop.run_until_complete(aclient.close())
        loop.close()

    assert list(asynchronous) == list(blocking)
    for label, result in blocking.items():
        assert asynchronous[label] == result, label
    # the script exercised what it claims: answers, hits, and each kind of error
    assert blocking["health"] == "SERVING"
    assert blocking["recall"][1] and blocking["read"][1][0][1]["hits"][1]
    raised = {label: r[1] for label, r in blocking.items()
              if isinstance(r, tuple) and r[0] == "raised"}
    assert raised == {
        "create_bank again": "AlreadyExistsError", "write bad mode": "InvalidArgumentError",
        "write both": "InvalidArgumentError", "read top_k 0": "InvalidArgumentError",
        "recall bad mode": "InvalidArgumentError", "describe dropped": "NotFoundError",
    }
