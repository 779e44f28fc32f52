"""Write-ahead log and snapshot files, module level: round trips, damage, atomicity."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from apcm.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from apcm.server.persistence import snapshot as snap
from apcm.server.persistence import wal
from apcm.server.persistence.snapshot import SnapshotCorrupt, SnapshotDirectory
from apcm.server.persistence.wal import WalCorruptError, WalError, WriteAheadLog
from safetensors import safe_open

HASH = "a" * 64


def _write_fields(rng: np.random.Generator, n: int, dtype: str, m: int = 6) -> dict:
    if dtype == "int8":
        codes = rng.integers(-128, 128, size=(n, m), dtype=np.int8)
    else:
        codes = rng.standard_normal((n, m)).astype(dtype)
    return {
        "slots": rng.integers(0, 1000, size=n, dtype=np.int64),
        "codes": codes,
        "keys": [f"key-{i}-ü✓" for i in range(n)],
        "payloads": [bytes(rng.integers(0, 256, size=i % 5, dtype=np.uint8)) for i in range(n)],
        "sequences": np.full(n, 7, dtype=np.int64),
    }


def _mutations(rng: np.random.Generator) -> list[wal.WalRecord]:
    return [
        wal.WalRecord(1, "create_bank", "b1", {"capacity": 64, "policy": "lfu_decay",
                                              "half_life": 250.0}),
        wal.WalRecord(2, "write", "b1", _write_fields(rng, 3, "float32")),
        wal.WalRecord(3, "write", "b1", _write_fields(rng, 1, "float16")),
        wal.WalRecord(4, "write", "b1", _write_fields(rng, 2, "int8")),
        wal.WalRecord(5, "delete", "b1", {"slots": np.array([4, 9], dtype=np.int64)}),
        wal.WalRecord(6, "clear", "b1", {}),
        wal.WalRecord(7, "drop_bank", "b1", {}),
    ]


def _assert_same(a: wal.WalRecord, b: wal.WalRecord) -> None:
    assert (a.seq, a.kind, a.bank) == (b.seq, b.kind, b.bank)
    assert a.fields.keys() == b.fields.keys()
    for k, v in a.fields.items():
        w = b.fields[k]
        if isinstance(v, np.ndarray):
            assert w.dtype == v.dtype and w.shape == v.shape
            np.testing.assert_array_equal(w, v)
        else:
            assert w == v


def _log(directory: Path, records: list[wal.WalRecord], mode: str = "fsync") -> WriteAheadLog:
    log = WriteAheadLog(directory, HASH, mode=mode, interval_s=0.01)
    log.open()
    for r in records:
        log.append(r.seq, r.kind, r.bank, r.fields)
    if records:
        log.wait_durable(records[-1].seq)
    return log


def _replay(directory: Path, after: int = 0) -> tuple[list[wal.WalRecord], wal.ReplayResult]:
    got: list[wal.WalRecord] = []
    result = wal.replay(directory, HASH, after, got.append)
    return got, result


# ----------------------------------------------------------------------------- WAL


@pytest.mark.parametrize("mode", ["fsync", "interval", "off"])
def test_wal_round_trip_every_kind_and_code_dtype(tmp_path: Path, mode: str) -> None:
    records = _mutations(np.random.default_rng(0))
    log = _log(tmp_path, records, mode)
    # Read while the log is still open, as after kill -9: wait_durable already wrote.
    got, result = _replay(tmp_path)
    log.close()
    assert len(got) == len(records)
    for a, b in zip(records, got, strict=True):
        _assert_same(a, b)
    assert result.last_seq == 7 and result.applied == 7 and result.truncated_bytes == 0


def test_wal_replay_skips_records_a_snapshot_holds(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(1))
    _log(tmp_path, records).close()
    got, result = _replay(tmp_path, after=4)
    assert [r.seq for r in got] == [5, 6, 7]
    assert result.last_seq == 7


def test_wal_group_commit_shares_fsyncs_and_loses_nothing(tmp_path: Path) -> None:
    class FsyncCounter:
        def __init__(self) -> None:
            self.fsyncs = 0
            self.wal_bytes = 0

        def observe_fsync(self, seconds: float) -> None:
            self.fsyncs += 1

        def set_wal_bytes(self, n: int) -> None:
            self.wal_bytes = n

    counter = FsyncCounter()
    log = WriteAheadLog(tmp_path, HASH, mode="fsync", metrics=counter)
    log.open()
    seq_lock = threading.Lock()
    next_seq = [0]
    rng = np.random.default_rng(2)
    fields = _write_fields(rng, 2, "float32")

    def writer() -> None:
        for _ in range(40):
            with seq_lock:  # stands in for the store lock append runs under
                next_seq[0] += 1
                seq = next_seq[0]
                log.append(seq, "write", "b", fields)
            log.wait_durable(seq)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writes = 16 * 40
    assert counter.fsyncs < writes  # concurrent writers shared fsyncs
    assert counter.wal_bytes == log.size_bytes == sum(
        p.stat().st_size for _, p in wal.list_segments(tmp_path))
    log.close()
    got, _ = _replay(tmp_path)
    assert sorted(r.seq for r in got) == list(range(1, writes + 1))


def test_wal_torn_tail_is_truncated_and_log_continues(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(3))
    _log(tmp_path, records).close()
    (_, path), = wal.list_segments(tmp_path)
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 5)  # the last record's write was cut short
    got, result = _replay(tmp_path)
    assert [r.seq for r in got] == [1, 2, 3, 4, 5, 6]
    assert result.truncated_bytes > 0
    assert path.stat().st_size == full - 5 - result.truncated_bytes
    # Appending after recovery goes to a new segment; everything replays cleanly.
    _log(tmp_path, [wal.WalRecord(8, "clear", "b1", {})]).close()
    got, result = _replay(tmp_path)
    assert [r.seq for r in got] == [1, 2, 3, 4, 5, 6, 8]
    assert result.truncated_bytes == 0


def test_wal_tail_of_zeros_is_a_torn_write(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(4))
    _log(tmp_path, records).close()
    (_, path), = wal.list_segments(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # file grew but its blocks were never written
    got, result = _replay(tmp_path)
    assert len(got) == len(records)
    assert result.truncated_bytes == 4096 and path.stat().st_size == size


def test_wal_bad_crc_in_the_middle_stops_replay(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(5))
    _log(tmp_path, records).close()
    (_, path), = wal.list_segments(tmp_path)
    got, _ = _replay(tmp_path)
    data = bytearray(path.read_bytes())
    # Flip one byte inside record seq=3 (the third record): records 4..7 follow it.
    offsets = _record_offsets(path)
    data[offsets[2] + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    applied: list[wal.WalRecord] = []
    with pytest.raises(WalCorruptError) as exc:
        wal.replay(tmp_path, HASH, 0, applied.append)
    assert [r.seq for r in applied] == [1, 2]
    assert f"byte {offsets[2]}" in exc.value.message and "sequence 2" in exc.value.message
    assert exc.value.code == "FAILED_PRECONDITION"
    assert path.stat().st_size == len(data)  # nothing truncated on a mid-log error


def test_wal_damage_in_an_older_segment_is_never_a_torn_tail(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(6))
    log = _log(tmp_path, records[:3])
    log.rotate()
    for r in records[3:]:
        log.append(r.seq, r.kind, r.bank, r.fields)
    log.wait_durable(7)
    log.close()
    (_, first), _ = wal.list_segments(tmp_path)
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size - 3)
    with pytest.raises(WalCorruptError):
        _replay(tmp_path)


def test_wal_written_for_another_model_is_refused(tmp_path: Path) -> None:
    _log(tmp_path, _mutations(np.random.default_rng(7))[:1]).close()
    with pytest.raises(FailedPrecondition) as exc:
        wal.replay(tmp_path, "b" * 64, 0, lambda r: None)
    assert HASH in exc.value.message


def test_wal_rotation_and_deleting_covered_segments(tmp_path: Path) -> None:
    records = _mutations(np.random.default_rng(8))
    log = _log(tmp_path, records[:2])
    first = log.segment_index
    new = log.rotate()
    assert new == first + 1
    for r in records[2:]:
        log.append(r.seq, r.kind, r.bank, r.fields)
    log.wait_durable(7)
    assert log.delete_segments_before(new) == 1
    assert [i for i, _ in wal.list_segments(tmp_path)] == [new]
    assert log.size_bytes == sum(p.stat().st_size for _, p in wal.list_segments(tmp_path))
    log.close()
    got, _ = _replay(tmp_path)
    assert [r.seq for r in got] == [3, 4, 5, 6, 7]


def test_wal_refuses_appends_after_close(tmp_path: Path) -> None:
    log = _log(tmp_path, [])
    log.close()
    log.close()  # idempotent
    with pytest.raises(WalError):
        log.append(1, "clear", "b", {})


def test_wal_segment_cut_inside_its_header_is_removed(tmp_path: Path) -> None:
    _log(tmp_path, _mutations(np.random.default_rng(9))[:2]).close()
    log = _log(tmp_path, [])
    log.close()
    (_, path) = wal.list_segments(tmp_path)[-1]
    with open(path, "r+b") as f:
        f.truncate(10)  # crashed while writing the new segment's header
    got, _ = _replay(tmp_path)
    assert [r.seq for r in got] == [1, 2]
    assert not path.exists()


def _record_offsets(path: Path) -> list[int]:
    offsets = []
    size = path.stat().st_size
    prev_end = None
    for end, _ in wal.iter_segment(path):
        if prev_end is None:
            prev_end = _first_record_offset(path)
        offsets.append(prev_end)
        prev_end = end
    assert prev_end == size
    return offsets


def _first_record_offset(path: Path) -> int:
    head = path.read_bytes()[:16]
    meta_len = int.from_bytes(head[12:16], "little")
    return 16 + meta_len + 4


# ------------------------------------------------------------------------- snapshots


def _banks(rng: np.random.Generator) -> snap.Banks:
    n, m = 50, 8
    payloads = [bytes(rng.integers(0, 256, size=i % 7, dtype=np.uint8)) for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in payloads])]).astype(np.int64)
    return {
        "alpha": (
            {"capacity": n, "policy": "lfu", "half_life": 10.0},
            {
                "codes": rng.standard_normal((n, m)).astype(np.float16),
                "occupied": (rng.random(n) > 0.3).astype(np.uint8),
                "counts": rng.random(n),
                "sequences": np.arange(n, dtype=np.int64),
                "payload_data": np.frombuffer(b"".join(payloads), dtype=np.uint8).copy(),
                "payload_offsets": offsets,
                "key_data": np.zeros(0, dtype=np.uint8),
            },
        ),
        "beta.2": (
            {"capacity": 4, "policy": "lfu_decay", "half_life": 1000.0},
            {"codes": rng.integers(-128, 128, size=(4, m), dtype=np.int8)},
        ),
    }


def _write(directory: Path, name: str, seq: int = 9, created_at: float | None = None,
           banks: snap.Banks | None = None) -> snap.SnapshotInfo:
    return snap.write_snapshot(
        directory, name, banks=banks or _banks(np.random.default_rng(seq)), wal_sequence=seq,
        wal_segment=3, model_hash=HASH, codec_kind="pca", created_at=created_at,
    )


def test_snapshot_round_trip_is_plain_safetensors(tmp_path: Path) -> None:
    banks = _banks(np.random.default_rng(10))
    info = _write(tmp_path, "first", seq=42, banks=banks)
    assert info.valid and info.wal_sequence == 42 and info.banks == ["alpha", "beta.2"]
    path = tmp_path / "first.safetensors"
    assert info.size_bytes == path.stat().st_size
    with safe_open(str(path), framework="np") as f:
        assert f.metadata()["model_hash"] == HASH
        assert f.metadata()["checksum"].startswith("sha256:")
        assert "bank/beta.2/codes" in set(f.keys())
    loaded_info, loaded = snap.read_snapshot(path)
    assert loaded_info == info
    assert loaded.keys() == banks.keys()
    for bank, (cfg, arrays) in banks.items():
        assert loaded[bank][0] == cfg
        assert loaded[bank][1].keys() == arrays.keys()
        for k, arr in arrays.items():
            assert loaded[bank][1][k].dtype == arr.dtype
            np.testing.assert_array_equal(loaded[bank][1][k], arr)


@pytest.mark.parametrize("where", ["data", "end", "metadata"])
def test_snapshot_checksum_detects_a_flipped_byte(tmp_path: Path, where: str) -> None:
    _write(tmp_path, "s")
    path = tmp_path / "s.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if where == "data":
        pos = 8 + header_len + 17
    elif where == "end":
        pos = len(data) - 1
    else:  # a digit of wal_sequence: still valid JSON, wrong content
        pos = data.index(b'"wal_sequence":"9"') + len(b'"wal_sequence":"')
        data[pos] = ord("8") ^ 0xFF
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt) as exc:
        snap.read_snapshot(path)
    assert "checksum" in exc.value.message
    info = SnapshotDirectory(tmp_path).info("s")
    assert not info.valid and "checksum" in info.error


def test_snapshot_truncation_is_detected(tmp_path: Path) -> None:
    _write(tmp_path, "s")
    path = tmp_path / "s.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(SnapshotCorrupt):
        snap.read_snapshot(path)
    listed = SnapshotDirectory(tmp_path).list()
    assert [(i.name, i.valid) for i in listed] == [("s", False)]


def test_failed_snapshot_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path, "old")
    before = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x01" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap, "save_file", disk_full)
    with pytest.raises(OSError):
        _write(tmp_path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert SnapshotDirectory(tmp_path).info("old").valid


def test_existing_snapshot_is_never_overwritten(tmp_path: Path) -> None:
    _write(tmp_path, "s", seq=1)
    original = (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(AlreadyExists):
        _write(tmp_path, "s", seq=2)
    assert (tmp_path / "s.safetensors").read_bytes() == original


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", "..", "a..b", ".hidden", "-x", "x" * 65, "a\\b", "é"]
)
def test_snapshot_names_are_validated(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        _write(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_listing_is_newest_first_and_prune_keeps_k(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path, f"s{i}", seq=i + 1, created_at=1000.0 + i)
    directory = SnapshotDirectory(tmp_path)
    assert [i.name for i in directory.list()] == ["s4", "s3", "s2", "s1", "s0"]
    assert all(i.valid for i in directory.list())
    assert sorted(directory.prune(3)) == ["s0", "s1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s2.safetensors", "s3.safetensors", "s4.safetensors"]
    assert directory.prune(3) == []
