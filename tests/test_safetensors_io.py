"""The safetensors codec of snapshot files: files written before the codecs were merged
still load, and the encoder still writes them byte for byte. (The bank-move encoding
it also served went with the sharded mode's bank moves.)

``tests/fixtures/compat_snapshot.safetensors`` was written by the hand-written encoder
of commit d2e1bcd (``snapshot._save_safetensors``) from the arrays below; never
regenerate it with newer code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open

from apcm.server.persistence import snapshot as snap

FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOT = FIXTURES / "compat_snapshot.safetensors"
HASH = "sha256:" + "ab" * 32
CREATED_AT = 1_760_000_000.25


def bank_arrays(n: int, salt: int, scores: str = "<f8") -> dict[str, np.ndarray]:
    """Every dtype the tables name and empty arrays; values from arithmetic, not a random
    generator whose stream may change. The bank file holds big-endian ``scores`` (stored
    little-endian); the old snapshot writer checksummed such input before converting it."""
    i = np.arange(n, dtype=np.int64) + salt
    return {
        "codes": ((np.arange(n * 12).reshape(n, 12) * 37 + salt) % 256).astype(np.uint8),
        "inv_norms": (1.0 / (i + 1)).astype(np.float32),
        "counters": i * 1_000_003 - 7,
        "occupied": i % 3 != 0,
        "sequences": (i * 11).astype(np.uint64),
        "halves": (i.reshape(-1, 1) / 8 + np.array([0.5, -0.25])).astype(np.float16),
        "scores": (i / 3).astype(scores),
        "i8": (i - 3).astype(np.int8), "i16": (i * -300).astype(np.int16),
        "u16": (i * 500).astype(np.uint16), "i32": (i * -70_000).astype(np.int32),
        "u32": (i * 90_000).astype(np.uint32),
        "keys_offsets": np.zeros(0, dtype=np.int64), "nothing": np.zeros((0, 3), np.int32),
    }


def config(name: str) -> dict[str, object]:
    return {"name": name, "capacity": 5, "note": "naïve ✓"}  # non-ASCII: escaped JSON


def banks() -> snap.Banks:
    return {"alpha": (config("alpha"), bank_arrays(5, 0)),
            "beta.2": (config("beta.2"), bank_arrays(3, 9))}


def write_snapshot(directory: Path) -> Path:
    snap.write_snapshot(directory, "compat", banks=banks(), wal_sequence=42, wal_segment=3,
                        model_hash=HASH, codec_kind="pca", created_at=CREATED_AT)
    return directory / "compat.safetensors"


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k, a in want.items():
        assert got[k].dtype == a.dtype.newbyteorder("<") and got[k].shape == a.shape, k
        np.testing.assert_array_equal(got[k], a)


def test_snapshot_written_by_the_old_encoder_loads() -> None:
    info, loaded = snap.read_snapshot(SNAPSHOT)
    assert info.valid and info.wal_sequence == 42 and info.wal_segment == 3
    assert info.created_at == CREATED_AT and info.banks == ["alpha", "beta.2"]
    for bank, (cfg, arrays) in banks().items():
        assert loaded[bank][0] == cfg
        _assert_same(loaded[bank][1], arrays)
    header = snap.inspect_snapshot(SNAPSHOT, verify=False)
    assert header.model_hash == HASH and header.wal_sequence == 42
    mapped = snap.map_bank_arrays(SNAPSHOT, {"beta.2"})
    _assert_same(mapped["beta.2"], banks()["beta.2"][1])


def test_snapshot_encoder_writes_the_old_bytes(tmp_path: Path) -> None:
    assert write_snapshot(tmp_path).read_bytes() == SNAPSHOT.read_bytes()


def test_snapshot_fixture_is_plain_safetensors() -> None:
    with safe_open(str(SNAPSHOT), framework="np") as f:
        assert f.metadata()["format"] == snap.FORMAT
        np.testing.assert_array_equal(f.get_tensor("bank/alpha/codes"),
                                      bank_arrays(5, 0)["codes"])


def test_a_big_endian_array_passes_the_snapshot_checksum(tmp_path: Path) -> None:
    # The checksum once covered the array as given, the file the little-endian copy.
    arrays = bank_arrays(4, 1, ">f8")
    snap.write_snapshot(tmp_path, "be", banks={"b": (config("b"), arrays)}, wal_sequence=1,
                        wal_segment=1, model_hash=HASH, codec_kind="pca")
    _, loaded = snap.read_snapshot(tmp_path / "be.safetensors")
    _assert_same(loaded["b"][1], arrays)
