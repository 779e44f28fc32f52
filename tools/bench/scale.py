"""``apcm bench scale``: one machine at scale (issue 14): RAM per memory, concurrent
reads of one bank, and writes.

Every cell runs in a fresh child process (a clean RSS baseline, and torch's thread
count is per process) against ``MemoryStore`` directly, no RPC. With ``--baseline
REV`` the same cells also run on the ``server/`` package of git revision REV
(exported to a temp dir and imported as ``apcm.server`` in the child), side by side
in the same run, so the ratios hold on a loaded, shared machine.

- **RAM**: a bank of ``--capacity`` slots (int8 codes, m = 192) receives
  ``--memories`` memories, each with a key of 16 bytes and a payload of
  ``--payload-bytes``. Bytes per memory = process RSS growth / memories, and the
  bank's own accounting (``memory_bytes + payload_bytes``) / memories, against the
  raw code + key + payload bytes. Goal: <= 1.3x. RSS is also given for the second
  half of the fill alone, which leaves out one-off first-use allocations.
- **Reads**: ``--readers`` threads each send single-query top-10 reads of that bank
  for ``--seconds``; reads/s and CPU utilisation (process CPU seconds / wall
  seconds / usable cores), for each ``--torch-threads`` setting (0: torch's
  default). One reader is the serial reference.
- **Writes**: one thread writing one memory (key + payload) per call, writes/s.

Cells run one after another, in alternating order over ``--rounds``; every round's
row is reported (on a shared machine, other tenants move single numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apcm.server.memory.options import ReadOptions

CODE_DIM = 192
KEY_BYTES = 16
RAM_GOAL = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memories", type=int, default=100_000,
                        help="memories in the bank (default 100,000)")
    parser.add_argument("--capacity", type=int, default=1_048_576,
                        help="bank capacity, slots (default 1,048,576)")
    parser.add_argument("--payload-bytes", type=int, default=128,
                        help="payload per memory (default 128)")
    parser.add_argument("--readers", type=int, default=8, help="concurrent readers (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per read / write cell (default 3)")
    parser.add_argument("--torch-threads", default="1,0",
                        help="comma-separated torch thread settings to compare (0: torch's "
                             "default) [default %(default)s]")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, each running every cell, in alternating order (default 2)")
    parser.add_argument("--baseline", default="",
                        help="git revision whose server/ to measure side by side (default: none)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


# -- child -------------------------------------------------------------------------------
def _use_server_from(root: str) -> None:
    """Import ``apcm.server`` from ``root/server`` (a baseline revision) in this process."""
    import importlib.util

    path = Path(root) / "server"
    spec = importlib.util.spec_from_file_location(
        "apcm.server", path / "__init__.py", submodule_search_locations=[str(path)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["apcm.server"] = module
    spec.loader.exec_module(module)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["server_root"]:
        _use_server_from(spec["server_root"])
    import threading

    import torch

    from apcm.server.memory.store import MemoryStore

    try:  # what build_server does at start, in the revisions that have it
        from apcm.server.allocator import pin_mmap_threshold
    except ImportError:
        pass
    else:
        pin_mmap_threshold()
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    n, cap, pay = spec["memories"], spec["capacity"], spec["payload_bytes"]
    scale = torch.full((CODE_DIM,), 3.0 / 127)
    store = MemoryStore(code_dim=CODE_DIM, code_dtype="int8", scale=scale,
                        device=torch.device("cpu"), max_capacity=cap,
                        max_payload_bytes=max(pay, 1), max_key_length=64,
                        default_policy="lfu_decay", default_half_life=1000.0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(-120, 121, (min(8192, n - i), CODE_DIM), dtype=torch.int8,
                             generator=gen) for i in range(0, n, 8192)]
    payload = bytes(range(256)) * (pay // 256 + 2)  # every slice below is pay bytes long
    rss0 = _rss_bytes()
    store.create_bank("bench", cap)
    i, rss_half = 0, 0
    for codes in batches:
        k = codes.shape[0]
        store.write("bench", codes, [f"memory-{j:09d}" for j in range(i, i + k)],
                    [payload[j % 256:j % 256 + pay] for j in range(i, i + k)])
        i += k
        if not rss_half and i >= n // 2:
            rss_half, at_half = _rss_bytes(), i
    rss1 = _rss_bytes()  # before freeing the input batches, which rss0 also holds
    del batches
    info = store.describe("bench")
    assert info.occupied == n and info.payload_bytes == n * pay
    out: dict[str, Any] = {
        "rss_per_memory": (rss1 - rss0) / n,
        # the second half's growth alone: without one-off costs (first-use allocations)
        "rss_marginal": (rss1 - rss_half) / max(n - at_half, 1),
        "bank_per_memory": (info.memory_bytes + info.payload_bytes) / n,
        "raw_per_memory": CODE_DIM + len(f"memory-{0:09d}") + pay,
        "torch_threads": torch.get_num_threads(),
    }
    queries = torch.randn(64, CODE_DIM) * scale * 40

    def read_loop(count: list[int], stop: threading.Event, offset: int) -> None:
        j = offset
        while not stop.is_set():
            store.read("bench", queries[j % 64:j % 64 + 1], ReadOptions(top_k=10))
            j += 1
            count[0] += 1

    for readers in spec["readers"]:
        store.read("bench", queries[:1], ReadOptions(top_k=10))  # warm-up
        stop = threading.Event()
        counts = [[0] for _ in range(readers)]
        threads = [threading.Thread(target=read_loop, args=(counts[t], stop, t))
                   for t in range(readers)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(spec["seconds"])
        stop.set()
        for th in threads:
            th.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        done = sum(c[0] for c in counts)
        out[f"reads_{readers}"] = {"reads_per_s": done / wall,
                                   "cpu_cores_busy": cpu / wall,
                                   "cpu_ms_per_read": cpu / max(done, 1) * 1e3}
    codes = torch.randint(-120, 121, (1, CODE_DIM), dtype=torch.int8)
    writes, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["seconds"]:
        store.write("bench", codes, [f"extra-{writes:010d}"], [payload[:pay]])
        writes += 1
    out["writes_per_s"] = writes / (time.perf_counter() - t0)
    return out


# -- parent ------------------------------------------------------------------------------
def _export(rev: str, into: Path) -> Path:
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "server"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "apcm.tools.bench.scale", "--child",
                           json.dumps(spec)], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .common import describe_machine, machine, markdown_table

    threads = [int(t) for t in args.torch_threads.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="apcm-bench-scale-") as tmp:
        codes = [("this", "")]
        if args.baseline:
            codes.append((f"baseline {args.baseline}", str(_export(args.baseline, Path(tmp)))))
        cells = [(t, label, root) for t in threads for label, root in codes]
        for rnd in range(args.rounds):
            for t, label, root in cells if rnd % 2 == 0 else cells[::-1]:
                spec = {"server_root": root, "threads": t, "memories": args.memories,
                        "capacity": args.capacity, "payload_bytes": args.payload_bytes,
                        "readers": sorted({1, args.readers}), "seconds": args.seconds}
                r = _run_child(spec)
                row = {"round": rnd + 1, "code": label,
                       "torch_threads": t or f"default ({r['torch_threads']})",
                       "rss_per_memory": r["rss_per_memory"],
                       "rss_marginal": r["rss_marginal"],
                       "bank_per_memory": r["bank_per_memory"],
                       "raw_per_memory": r["raw_per_memory"],
                       "rss_ratio": r["rss_per_memory"] / r["raw_per_memory"],
                       "bank_ratio": r["bank_per_memory"] / r["raw_per_memory"],
                       "writes_per_s": r["writes_per_s"]}
                for readers in sorted({1, args.readers}):
                    cell = r[f"reads_{readers}"]
                    row[f"reads_per_s_{readers}"] = cell["reads_per_s"]
                    row[f"cores_busy_{readers}"] = cell["cpu_cores_busy"]
                    row[f"cpu_ms_per_read_{readers}"] = cell["cpu_ms_per_read"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    m = machine()
    n = args.readers
    rows.sort(key=lambda r: (str(r["torch_threads"]), r["code"], r["round"]))
    columns = [("code", "code"), ("torch_threads", "torch threads"), ("round", "round"),
               ("rss_per_memory", "RSS B/memory"), ("rss_marginal", "RSS B/memory, 2nd half"),
               ("bank_per_memory", "bank B/memory"),
               ("raw_per_memory", "raw B/memory"), ("rss_ratio", "RSS / raw"),
               ("bank_ratio", "bank / raw"),
               ("reads_per_s_1", "reads/s, 1 reader"), ("cores_busy_1", "cores busy, 1"),
               (f"reads_per_s_{n}", f"reads/s, {n} readers"),
               (f"cores_busy_{n}", f"cores busy, {n}"),
               (f"cpu_ms_per_read_{n}", f"CPU ms/read, {n}"), ("writes_per_s", "writes/s")]
    print()
    print(f"{args.memories:,} memories (int8 m={CODE_DIM}, {KEY_BYTES} B keys, "
          f"{args.payload_bytes} B payloads) in a bank of {args.capacity:,} slots; "
          f"{describe_machine(m)}\n")
    print(markdown_table(rows, columns))
    result = {"benchmark": "scale", "machine": m, "params": vars(args), "rows": rows,
              "ram_goal": RAM_GOAL}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
