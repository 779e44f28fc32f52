"""Write-ahead-log hardening: damage vs torn tails, gaps, I/O-error recovery, races."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from apcm.server.code_dtypes import CODE_DTYPES
from apcm.server.config import Settings
from apcm.server.errors import ApcmError, FailedPrecondition
from apcm.server.memory.store import MemoryStore
from apcm.server.metrics import Metrics
from apcm.server.persistence import wal
from apcm.server.persistence.manager import PersistenceManager
from apcm.server.persistence.wal import WalCorruptError, WalError, WriteAheadLog

HASH = "a" * 64


def _write_record(seq: int, rng: np.random.Generator) -> wal.WalRecord:
    return wal.WalRecord(seq, "write", "b", {
        "slots": np.array([seq], dtype=np.int64),
        "codes": rng.standard_normal((1, 6)).astype(np.float32),
        "keys": [f"k{seq}"], "payloads": [b"p" * (seq % 7)],
    })


def _fill(directory: Path, n: int) -> WriteAheadLog:
    rng = np.random.default_rng(n)
    log = WriteAheadLog(directory, HASH, mode="fsync")
    log.open()
    for seq in range(1, n + 1):
        r = _write_record(seq, rng)
        log.append(r.seq, log.prepare(r.kind, r.bank, r.fields))
        log.wait_durable(seq)
    return log


def _offsets(path: Path) -> list[int]:
    ends = [end for end, _ in wal.iter_segment(path)]
    head = path.read_bytes()[:16]
    first = 16 + int.from_bytes(head[12:16], "little") + 4
    return [first, *ends[:-1]]


def _flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mask", [0x01, 0x40, 0x80])
def test_flipped_bit_in_a_record_length_is_corruption_not_a_torn_tail(
    tmp_path: Path, mask: int
) -> None:
    _fill(tmp_path, 50).close()
    (_, path), = wal.list_segments(tmp_path)
    size = path.stat().st_size
    offsets = _offsets(path)
    # The length's most significant byte: the record now "runs past the end of the file".
    _flip(path, offsets[0] + 3, mask)
    applied: list[wal.WalRecord] = []
    with pytest.raises(WalCorruptError) as exc:
        wal.replay(tmp_path, HASH, 0, applied.append)
    assert applied == []
    assert f"byte {offsets[0]}" in exc.value.message
    assert path.stat().st_size == size  # nothing acknowledged was cut off


def test_flipped_bit_in_the_last_records_length_keeps_it(tmp_path: Path) -> None:
    _fill(tmp_path, 5).close()
    (_, path), = wal.list_segments(tmp_path)
    size = path.stat().st_size
    _flip(path, _offsets(path)[-1] + 3, 0x10)
    applied: list[wal.WalRecord] = []
    with pytest.raises(WalCorruptError):
        wal.replay(tmp_path, HASH, 0, applied.append)
    assert [r.seq for r in applied] == [1, 2, 3, 4]
    assert path.stat().st_size == size


def test_torn_tail_logs_what_it_dropped(tmp_path: Path, caplog) -> None:
    _fill(tmp_path, 5).close()
    (_, path), = wal.list_segments(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as f:  # a write the crash cut short, past the acknowledged end
        f.write(wal.encode_record(6, "clear", "b", {})[:-3])
    applied: list[wal.WalRecord] = []
    with caplog.at_level(logging.WARNING):
        result = wal.replay(tmp_path, HASH, 0, applied.append)
    assert [r.seq for r in applied] == [1, 2, 3, 4, 5]
    assert path.stat().st_size == size
    assert (f"torn final write at byte {size} (record runs past the end of the file); "
            f"dropping {result.truncated_bytes} bytes after sequence 5: it lies past the "
            f"acknowledged end at byte {size} (sequence 5): never acknowledged") in caplog.text


def test_an_acknowledged_record_cut_short_is_damage(tmp_path: Path) -> None:
    _fill(tmp_path, 5).close()
    (_, path), = wal.list_segments(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    applied: list[wal.WalRecord] = []
    with pytest.raises(WalCorruptError, match="acknowledged sequence 5 is lost"):
        wal.replay(tmp_path, HASH, 0, applied.append)
    assert [r.seq for r in applied] == [1, 2, 3, 4]
    # the same tail without the mark (a log written before marks existed): torn
    (tmp_path / path.name).with_suffix(".acked").unlink()
    result = wal.replay(tmp_path, HASH, 0, lambda r: None)
    assert result.truncated_bytes > 0


@pytest.mark.parametrize("shape", [[4611686018427387904, 2, 2], [4294967296, 4294967296],
                                   [0, 4611686018427387904, 4]])
def test_tensor_shapes_whose_size_overflows_are_a_format_error(shape: list[int]) -> None:
    from apcm.v1 import tensor_pb2
    from apcm.wire.tensors import TensorFormatError, from_proto

    tensor = tensor_pb2.Tensor(shape=shape, dtype=tensor_pb2.DTYPE_FLOAT32, data=b"")
    with pytest.raises(TensorFormatError, match="needs|too large"):
        from_proto(tensor)


# ------------------------------------------------------------------ manager-level helpers


def _store() -> MemoryStore:
    return MemoryStore(
        code_dim=8, code_dtype="float16", scale=None, device=torch.device("cpu"),
        max_capacity=100_000, max_payload_bytes=1024, max_key_length=64,
        default_policy="lfu", default_half_life=100.0,
    )


def _manager(data_dir: Path, store: MemoryStore, metrics: Any = None,
             **settings: object) -> PersistenceManager:
    base: dict[str, object] = {"data_dir": str(data_dir), "snapshot_interval_s": 0.0}
    base.update(settings)
    return PersistenceManager(store, Settings(**base).validated(), HASH, "pca",  # type: ignore[arg-type]
                              metrics=metrics)


def _started(data_dir: Path, **settings: object) -> tuple[MemoryStore, PersistenceManager]:
    store = _store()
    mgr = _manager(data_dir, store, **settings)
    mgr.recover()
    mgr.start()
    return store, mgr


def _writes(store: MemoryStore, n: int, seed: int, bank: str = "b") -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        store.write(bank, torch.randn(1, 8, generator=gen).half(), [f"k{seed}-{i}"],
                    [f"p{seed}-{i}".encode()])


def _recovered(data_dir: Path, **settings: object) -> MemoryStore:
    store = _store()
    _manager(data_dir, store, **settings).recover()
    return store


def _same(a: MemoryStore, b: MemoryStore) -> None:
    sa, sb = a.export_state(), b.export_state()
    assert sa.last_seq == sb.last_seq
    assert sa.banks.keys() == sb.banks.keys()
    for name, (cfg, arrays) in sa.banks.items():
        assert sb.banks[name][0] == cfg
        for k, arr in arrays.items():
            np.testing.assert_array_equal(sb.banks[name][1][k], arr, err_msg=f"{name}/{k}")


# ------------------------------------------------------------------ item: I/O error recovery


def test_log_recovers_after_an_io_error_once_the_cause_is_gone(
    tmp_path: Path, file_size_limit
) -> None:
    metrics = Metrics(CollectorRegistry())
    store = _store()
    mgr = _manager(tmp_path, store, metrics=metrics)
    events: list[bool] = []
    recovered = threading.Event()
    mgr.add_wal_listener(lambda ok: (events.append(ok), ok and recovered.set()))
    mgr.recover()
    mgr.start()
    store.create_bank("b", 100)
    _writes(store, 3, seed=1)
    assert mgr.wal_healthy and events == [True]
    recovered.clear()
    assert mgr.wal is not None
    with file_size_limit(mgr.wal.size_bytes):  # the segment cannot grow: like a full disk
        with pytest.raises(WalError) as exc:
            _writes(store, 1, seed=2)
        assert exc.value.code == "UNAVAILABLE" and "File too large" in exc.value.message
        assert not mgr.wal_healthy and events[-1] is False
        assert metrics.registry.get_sample_value("apcm_wal_healthy") == 0
        with pytest.raises(WalError) as exc:  # refused up front while the disk fails
            store.create_bank("c", 10)
        assert exc.value.code == "UNAVAILABLE"
    assert recovered.wait(10.0), "the log never recovered after the cause was gone"
    assert mgr.wal_healthy and metrics.registry.get_sample_value("apcm_wal_healthy") == 1
    _writes(store, 2, seed=3)
    store.create_bank("c", 10)
    # The write that failed is visible in memory, so the recovery logged it too.
    _same(store, _recovered(tmp_path))


def test_a_snapshot_after_the_cause_is_gone_makes_the_log_usable(
    tmp_path: Path, file_size_limit
) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    assert mgr.wal is not None
    mgr.wal.retry_s = 3600.0  # only the snapshot's rotation retries here
    with file_size_limit(mgr.wal.size_bytes), pytest.raises(WalError):
        _writes(store, 1, seed=2)
    mgr.snapshot("after-disk-freed")
    assert mgr.wal_healthy
    _writes(store, 2, seed=3)
    _same(store, _recovered(tmp_path))


# ------------------------------------------------------------------ item: snapshot temp files


def test_a_snapshot_killed_mid_write_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    # The child writes a snapshot with a file-size limit and default SIGXFSZ handling: the
    # kernel kills it in the middle of writing the file, as a kill -9 would.
    script = f"""
import resource, signal, torch
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
from apcm.server.code_dtypes import CODE_DTYPES
from apcm.server.config import Settings
from apcm.server.memory.store import MemoryStore
from apcm.server.persistence.manager import PersistenceManager
store = MemoryStore(code_dim=8, code_dtype="float16", scale=None, device=torch.device("cpu"),
                    max_capacity=100_000, max_payload_bytes=1024, max_key_length=64,
                    default_policy="lfu", default_half_life=100.0)
mgr = PersistenceManager(store, Settings(data_dir={str(tmp_path)!r},
                         snapshot_interval_s=0.0).validated(), {HASH!r}, "pca")
mgr.recover()
store.create_bank("b", 50_000)
store.write("b", torch.zeros(5000, 8).half(), [], [])  # a snapshot of ~225 KB
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
mgr.snapshot("big")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()
    snapdir = tmp_path / "snapshots"
    assert [p.name for p in snapdir.iterdir()], "the killed write left no file to clean"
    (snapdir / ".tmpAb12Cd").write_bytes(b"\0" * 10)  # as safetensors.save_file left them
    _recovered(tmp_path)
    assert sorted(p.name for p in snapdir.iterdir()) == []


# ------------------------------------------------------------------ item: covered damage


def test_damage_in_a_segment_the_snapshot_covers_does_not_stop_start_up(
    tmp_path: Path, caplog
) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    _writes(store, 3, seed=1)
    mgr.snapshot("first")
    _writes(store, 3, seed=2)
    newest = mgr.snapshot("second")
    _writes(store, 2, seed=3)
    covered = [p for i, p in wal.list_segments(tmp_path / "wal") if i < newest.wal_segment]
    assert covered, "the fallback snapshot keeps a segment the newest covers"
    _flip(covered[-1], _offsets(covered[-1])[1] + 20, 0xFF)
    with caplog.at_level(logging.WARNING):
        recovered = _recovered(tmp_path)
    _same(store, recovered)
    assert "SKIPPING" in caplog.text and covered[-1].name in caplog.text


# ------------------------------------------------------------------ item: missing segments


def test_deleting_the_newest_segment_after_a_snapshot_refuses_to_start(tmp_path: Path) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    info = mgr.snapshot("s")
    _writes(store, 4, seed=1)
    (_, newest), = [s for s in wal.list_segments(tmp_path / "wal") if s[0] >= info.wal_segment]
    newest.unlink()
    with pytest.raises(FailedPrecondition) as exc:
        _recovered(tmp_path)
    assert newest.name in exc.value.message and "allow-empty-start" in exc.value.message
    assert _recovered(tmp_path, allow_empty_start=True).last_seq == info.wal_sequence


def test_deleting_the_newest_segment_without_a_snapshot_refuses_to_start(tmp_path: Path) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    _writes(store, 2, seed=1)
    mgr.close(final_snapshot=False)
    store, mgr = _started(tmp_path)  # a restart: the new segment follows the old one
    _writes(store, 3, seed=2)
    _, newest = wal.list_segments(tmp_path / "wal")[-1]
    newest.unlink()
    with pytest.raises(FailedPrecondition) as exc:
        _recovered(tmp_path)
    assert newest.name in exc.value.message
    assert _recovered(tmp_path, allow_empty_start=True).last_seq == 3


def test_a_segment_missing_in_the_middle_refuses_to_start(tmp_path: Path, caplog) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    _writes(store, 2, seed=1)
    assert mgr.wal is not None
    mgr.wal.rotate()
    _writes(store, 2, seed=2)
    mgr.wal.rotate()
    _writes(store, 2, seed=3)
    middle = wal.list_segments(tmp_path / "wal")[1][1]
    middle.unlink()
    with pytest.raises(FailedPrecondition, match="sequences 4..5"):
        _recovered(tmp_path)
    with caplog.at_level(logging.ERROR):
        _recovered(tmp_path, allow_empty_start=True)
    assert "sequences 4..5" in caplog.text


# ------------------------------------------------------------------ item: restore


def test_a_restore_whose_snapshot_fails_changes_nothing(tmp_path: Path, file_size_limit) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 2000)
    store.write("b", torch.zeros(1000, 8).half(), [], [])  # snapshots hold used slots only
    _writes(store, 3, seed=1)
    mgr.snapshot("base")
    _writes(store, 3, seed=2)
    store.create_bank("extra", 2000)
    before = store.export_state()
    assert mgr.wal is not None
    # The restored state's snapshot (tens of KB) cannot be written; log records still fit.
    with file_size_limit(mgr.wal.size_bytes + 8192), pytest.raises(ApcmError) as exc:
        mgr.restore("base")
    assert exc.value.code == "UNAVAILABLE" and "EFBIG" in exc.value.message
    after = store.export_state()
    assert after.banks.keys() == before.banks.keys() and after.last_seq == before.last_seq
    _writes(store, 2, seed=3)  # acknowledged: they must be in whatever a crash recovers
    _same(store, _recovered(tmp_path))


def test_restore_then_crash_recovers_the_restored_state_plus_later_writes(
    tmp_path: Path,
) -> None:
    store, mgr = _started(tmp_path)
    store.create_bank("b", 100)
    _writes(store, 3, seed=1)
    mgr.snapshot("base")
    _writes(store, 3, seed=2)
    store.create_bank("extra", 10)
    mgr.restore("base")
    assert [b.name for b in store.list()] == ["b"]
    _writes(store, 2, seed=3)
    _same(store, _recovered(tmp_path))  # no close(): the process dies here


# ------------------------------------------------------------------ item: CreateSnapshot errors


def test_create_snapshot_on_a_failing_disk_is_unavailable_naming_the_cause(
    make_server: Any, file_size_limit
) -> None:
    from apcm.client import MemoryClient
    from apcm.client.errors import UnavailableError

    server = make_server()
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=30.0, retries=0) as client:
        client.create_bank("big", 4096)
        store = server.service.store  # fill it: snapshots hold used slots only
        store.write("big", torch.zeros(4096, store.code_dim,
                                       dtype=CODE_DTYPES[store.code_dtype]), [], [])
        with file_size_limit(16_384), pytest.raises(UnavailableError) as exc:
            client.create_snapshot("s1")
        assert "EFBIG" in str(exc.value) and "s1.safetensors" in str(exc.value)
        assert client.create_snapshot("s1").name == "s1"  # nothing half-written is left


# ------------------------------------------------------------------ item: races in the log


def test_rotation_races_with_the_sync_thread_and_writers_keep_the_log_exact(
    tmp_path: Path,
) -> None:
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # many more thread switches inside the racy windows
    try:
        store, mgr = _started(tmp_path, wal_mode="interval", wal_interval_s=0.0001,
                              snapshot_keep=2)
        store.create_bank("b", 5000)
        errors: list[BaseException] = []

        def writer(seed: int) -> None:
            try:
                _writes(store, 150, seed=seed)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for _ in range(40):
            assert mgr.wal is not None
            mgr.wal.rotate()
            mgr.wal.delete_segments_before(mgr.wal.segment_index - 1)
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert mgr.wal is not None
        on_disk = sum(p.stat().st_size for _, p in wal.list_segments(tmp_path / "wal"))
        assert mgr.wal.size_bytes == on_disk
        assert mgr.wal_healthy
    finally:
        sys.setswitchinterval(old_interval)


# ------------------------------------------------------------------ version-1 segments


def _v1_segment(path: Path, records: list[tuple[int, str, str, dict]]) -> None:
    """A segment exactly as the version-1 writer framed it (the format before the v2 bump)."""
    import json
    import struct
    import zlib

    meta = json.dumps({"model_hash": HASH, "segment": 1, "created_at": 0.0})
    head = struct.pack("<8sII", b"APCMWAL\n", 1, len(meta)) + meta.encode()
    out = [head + struct.pack("<I", zlib.crc32(head))]
    for seq, kind, bank, fields in records:
        scalars, arrays, blobs = {}, [], []
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                arrays.append([name, "nd", value.dtype.str, list(value.shape)])
                blobs.append(value.tobytes())
            elif isinstance(value, list):
                items = [v.encode() if isinstance(v, str) else v for v in value]
                tag = "str" if isinstance(value[0], str) else "bytes"
                arrays.append([name, tag, "<i8", [len(items)]])
                blobs += [np.array([len(b) for b in items], dtype="<i8").tobytes(), *items]
            else:
                scalars[name] = value
        m = json.dumps({"kind": kind, "bank": bank, "scalars": scalars, "arrays": arrays},
                       separators=(",", ":")).encode()
        body = b"".join([struct.pack("<QI", seq, len(m)), m, *blobs])
        length = struct.pack("<I", len(body))
        out.append(length + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body)
    path.write_bytes(b"".join(out))


def test_version_1_segments_still_replay(tmp_path: Path) -> None:
    (tmp_path / "wal").mkdir()
    codes = np.arange(16, dtype=np.float16).reshape(2, 8)
    _v1_segment(wal.segment_path(tmp_path / "wal", 1), [
        (1, "create_bank", "b", {"capacity": 10, "policy": "lfu", "half_life": 100.0}),
        (3, "write", "b", {"slots": np.array([0, 1], dtype=np.int64), "codes": codes,
                           "keys": ["x", "y"], "payloads": [b"1", b"2"],
                           "sequences": np.array([2, 3], dtype=np.int64)}),
    ])
    store, mgr = _started(tmp_path)
    assert store.last_seq == 3
    np.testing.assert_array_equal(store.export_state().banks["b"][1]["codes"][:2], codes)
    _writes(store, 2, seed=1)  # into a version-2 segment after the version-1 one
    _same(store, _recovered(tmp_path))


# ------------------------------------------------------------------ recovery speed


def test_merged_replay_of_write_runs_equals_the_live_state(tmp_path: Path) -> None:
    # Small banks: items evict each other, keys are overwritten in place and the same
    # slot repeats within a merged run; deletes and clears cut runs.
    store, _ = _started(tmp_path)
    store.create_bank("a", 8)
    store.create_bank("b", 5)
    gen = torch.Generator().manual_seed(0)
    for i in range(120):
        bank = "ab"[i // 10 % 2]  # runs of 10 writes to one bank
        n = 1 + i % 3
        keys = [f"k{(i + j) % 11}" if (i + j) % 3 else "" for j in range(n)]
        payloads = [b"x" * j for j in range(n)]
        store.write(bank, torch.randn(n, 8, generator=gen).half(), keys, payloads)
        if i % 17 == 0:
            store.delete(bank, [i % 5], [])
        if i == 60:
            store.clear("b")
    _same(store, _recovered(tmp_path))


def test_the_log_growing_past_snapshot_wal_bytes_triggers_a_snapshot(tmp_path: Path) -> None:
    store, mgr = _started(tmp_path, snapshot_wal_bytes=20_000)
    store.create_bank("b", 1000)
    assert mgr.list_snapshots() == []
    gen = torch.Generator().manual_seed(0)
    for i in range(30):  # ~1 KB of payload per write: past 20 KB
        store.write("b", torch.randn(1, 8, generator=gen).half(), [f"k{i}"], [b"x" * 1000])
    deadline = threading.Event()
    for _ in range(100):  # bounded: 10 s at most
        if mgr.list_snapshots():
            break
        deadline.wait(0.1)
    snaps = mgr.list_snapshots()
    assert len(snaps) == 1 and 15 <= snaps[0].wal_sequence < 31
    mgr.close(final_snapshot=False)
    _same(store, _recovered(tmp_path))


def test_kill_during_a_restore_recovers_the_pre_restore_state(tmp_path: Path) -> None:
    # The child is killed by the kernel (SIGXFSZ) while writing the restored state's
    # snapshot: a deterministic kill -9 inside RestoreSnapshot.
    script = f"""
import resource, signal, torch
from apcm.server.code_dtypes import CODE_DTYPES
from apcm.server.config import Settings
from apcm.server.memory.store import MemoryStore
from apcm.server.persistence.manager import PersistenceManager
store = MemoryStore(code_dim=8, code_dtype="float16", scale=None, device=torch.device("cpu"),
                    max_capacity=100_000, max_payload_bytes=1024, max_key_length=64,
                    default_policy="lfu", default_half_life=100.0)
mgr = PersistenceManager(store, Settings(data_dir={str(tmp_path)!r},
                         snapshot_interval_s=0.0).validated(), {HASH!r}, "pca")
mgr.recover(); mgr.start()
store.create_bank("b", 20_000)
gen = torch.Generator().manual_seed(0)
def put(tag, n):
    for i in range(n):
        store.write("b", torch.randn(1, 8, generator=gen).half(), [f"{{tag}}{{i}}"], [b"p"])
store.write("b", torch.zeros(3000, 8).half(), [], [])  # a snapshot of ~135 KB
put("a", 3)
mgr.snapshot("base")
put("b", 4)
store.create_bank("extra", 10)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
mgr.restore("base")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()
    recovered = _recovered(tmp_path)
    assert [b.name for b in recovered.list()] == ["b", "extra"]
    with recovered.get("b").lock:
        assert recovered.get("b").stats().occupied == 3007  # every acknowledged write


def test_write_health_follows_the_log_while_reads_keep_serving(
    make_server, file_size_limit
) -> None:
    """While the log cannot make writes durable, the health status of writes is
    NOT_SERVING and writes get UNAVAILABLE naming the cause; reads and the service
    status keep serving; once the cause is gone both come back."""
    from apcm.client import MemoryClient, UnavailableError
    from apcm.server.api.app import WRITES_HEALTH_NAME

    server = make_server()
    with MemoryClient(f"127.0.0.1:{server.port}", timeout=30.0, retries=0) as client:
        codes = np.eye(8, dtype=np.float32)[:1]
        client.write(codes=codes, mode="per_item", keys=["before"])
        assert client.health(WRITES_HEALTH_NAME) == "SERVING"
        wal = server.service.persistence.wal
        assert wal is not None
        wal.retry_s = 0.2
        with file_size_limit(wal.size_bytes):
            with pytest.raises(UnavailableError, match="File too large"):
                client.write(codes=codes, mode="per_item", keys=["refused"])
            assert client.health(WRITES_HEALTH_NAME) == "NOT_SERVING"
            assert client.health() == "SERVING"
            assert client.read(codes=codes, top_k=1)[0].hits[0].key == "before"
        deadline = time.monotonic() + 10
        while client.health(WRITES_HEALTH_NAME) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.health(WRITES_HEALTH_NAME) == "SERVING"
        client.write(codes=codes, mode="per_item", keys=["after"])


def test_damage_before_intact_records_is_never_cut_even_when_loss_is_allowed(
    tmp_path: Path
) -> None:
    _fill(tmp_path, 5).close()
    (_, path), = wal.list_segments(tmp_path)
    size = path.stat().st_size
    _flip(path, _offsets(path)[2] + 20, 0x08)  # record 3's body; 4 and 5 follow intact
    with pytest.raises(WalCorruptError, match="is corrupt at byte"):
        wal.replay(tmp_path, HASH, 0, lambda r: None, allow_loss=True)
    assert path.stat().st_size == size
