"""Resident memory grows with what a bank stores (issue 14): measured in a fresh
process, as the server runs it (``build_server`` pins glibc's mmap threshold)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apcm.server.allocator import pin_mmap_threshold

CHILD = r"""
import json, os, sys, torch
from apcm.server.allocator import pin_mmap_threshold
from apcm.server.memory.store import MemoryStore

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
n, dim, payload_bytes = 100_000, 192, 128
store = MemoryStore(code_dim=dim, code_dtype="int8", scale=torch.full((dim,), 0.02),
                    device=torch.device("cpu"), max_capacity=1 << 20,
                    max_payload_bytes=payload_bytes, max_key_length=64,
                    default_policy="lfu", default_half_life=100.0)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(-120, 121, (4096, dim), dtype=torch.int8, generator=gen)
           for _ in range(0, n, 4096)]
before = rss()
store.create_bank("b", 1 << 20)
written = 0
for codes in batches:
    k = min(codes.shape[0], n - written)
    store.write("b", codes[:k], [f"memory-{j:09d}" for j in range(written, written + k)],
                [bytes([j % 251]) * payload_bytes for j in range(written, written + k)])
    written += k
print(json.dumps({"pinned": pinned, "per_memory": (rss() - before) / n,
                  "raw": dim + len("memory-000000000") + payload_bytes,
                  "occupied": store.describe("b").occupied}))
"""


def _fill(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not pin_mmap_threshold(),
                    reason="needs glibc's mallopt and /proc")
def test_pinning_the_mmap_threshold_keeps_freed_bank_arrays_out_of_resident_memory() -> None:
    pinned, dynamic = _fill("pin"), _fill("dynamic")
    assert pinned["pinned"] and not dynamic["pinned"]
    assert pinned["occupied"] == dynamic["occupied"] == 100_000
    # measured here: 535 B pinned, 754 B dynamic for 336 raw bytes (code + key + payload)
    assert pinned["per_memory"] <= 0.85 * dynamic["per_memory"], (pinned, dynamic)
    assert pinned["per_memory"] <= 1.8 * pinned["raw"], pinned
