"""Banks store packed IDRP v2 codes in a byte-aligned bit layout of their own: the same
cells as the codec's wire layout, converted at the bank's edges (writes and log replay
in, reconstructions out, snapshots marked with their layout), so that the lookup-table
scan reads one table per byte. Nothing a client sees changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT_MODEL, start_text_server

from apcm.client import MemoryClient
from apcm.server.codecs.base import load_codec
from apcm.server.codecs.idrp.transform import BitPacker, byte_aligned_order
from apcm.server.codecs.idrp.v2 import TransformCodec
from apcm.server.codecs.idrp.v2scorer import ALIGNED, WIRE
from apcm.server.memory import export
from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.eviction import make_policy
from apcm.server.memory.options import ReadOptions

ROOT = Path(__file__).resolve().parents[1]
V2_MODELS = ["text-minilm", "text-minilm-4x", "text-minilm-16x", "text-minilm-32x",
             "digits-v2", "gravel-grey"]


def _codec(name: str) -> TransformCodec:
    codec = load_codec(str(ROOT / "model_weights" / f"{name}.safetensors"), "cpu")
    assert isinstance(codec, TransformCodec)
    return codec


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def _crossing(packer: BitPacker) -> int:
    """Coded fields that cross a byte boundary (their window shift is below 8)."""
    return int(((packer._mask > 0) & (packer._wshift < 8)).sum())


@pytest.mark.parametrize("name", V2_MODELS)
def test_aligned_layout_holds_the_same_cells_with_fewer_fields_across_bytes(name: str) -> None:
    codec = _codec(name)
    bits = codec.model.bits
    order = byte_aligned_order(bits)
    assert sorted(order) == torch.nonzero(bits > 0).flatten().tolist()
    aligned = BitPacker(bits, order)
    wire = codec.model.packer
    assert aligned.n_bytes == wire.n_bytes
    assert _crossing(aligned) <= _crossing(wire)
    gen = torch.Generator().manual_seed(0)
    cells = torch.stack([torch.randint(0, 1 << int(b), (64,), generator=gen) if b > 0
                         else torch.zeros(64, dtype=torch.int64) for b in bits.tolist()], 1)
    assert torch.equal(aligned.unpack(aligned.pack(cells)).long(), cells)
    scorer = codec.scorer.stored()
    codes = wire.pack(cells)
    stored = scorer.to_stored(codes)
    assert torch.equal(scorer.from_stored(stored), codes)
    assert torch.equal(scorer.codes(stored), codec.scorer.codes(codes))


def test_the_default_model_scans_almost_only_whole_bytes() -> None:
    codec = _codec("text-minilm")
    assert _crossing(codec.model.packer) > 100  # the wire layout: fields in width order
    assert _crossing(codec.scorer.stored().packer) <= 8


def test_in_place_row_scores_equal_the_gathered_rows() -> None:
    codec = _codec("text-minilm")
    scorer = codec.scorer.stored()
    codes = scorer.to_stored(codec.compress(_unit(3000, 384, 1)))
    queries = scorer.queries(codec.encode_latent(_unit(2, 384, 2)))
    at = torch.from_numpy(np.random.default_rng(3).choice(3000, 700, replace=False))
    in_place = scorer.dots(queries, codes, at)
    gathered = scorer.dots(queries, codes.index_select(0, at))
    assert in_place is not None and gathered is not None
    assert torch.equal(in_place, gathered)
    decoded = scorer.codes(codes.index_select(0, at)) @ queries.T
    torch.testing.assert_close(in_place, decoded.T, rtol=0, atol=1e-4)


def test_a_snapshot_of_wire_codes_restores_into_the_stored_layout() -> None:
    """Snapshots written before banks had a layout of their own hold wire codes and no
    ``code_layout``: they are converted on restore, and the bank reads as before."""
    codec = _codec("text-minilm")
    wire_bank = MemoryBank("b", 500, code_dim=192, code_dtype="uint8", scale=None, device="cpu",
                           policy=make_policy("lfu", 0.0), max_payload_bytes=8,
                           max_key_length=8, scorer=codec.scorer)
    x = _unit(400, 384, 4)
    codes = codec.compress(x)
    wire_bank.apply_write(list(range(400)), codes, [None] * 400, [None] * 400,
                          list(range(1, 401)))
    config, arrays = export.export(wire_bank)
    assert config["code_layout"] == WIRE
    del config["code_layout"]
    restored = export.from_export(config, arrays, scale=None, device=torch.device("cpu"),
                                  max_payload_bytes=8, max_key_length=8,
                                  scorer=codec.scorer.stored())
    assert restored.code_layout == ALIGNED
    assert not torch.equal(restored.codes[:400], codes)
    assert torch.equal(restored.wire_codes(restored.codes[:400]), codes)
    q = codec.encode_latent(_unit(5, 384, 5))
    options = ReadOptions(top_k=10, count_access=False)
    before = wire_bank.read(q, options).results
    after = restored.read(q, options).results
    for a, b in zip(before, after, strict=True):
        assert [h.slot for h in a.hits] == [h.slot for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits],
                                   atol=1e-5)
    again_config, again = export.export(restored)
    assert again_config["code_layout"] == ALIGNED
    back = export.from_export(again_config, again, scale=None, device=torch.device("cpu"),
                              max_payload_bytes=8, max_key_length=8, scorer=codec.scorer)
    assert torch.equal(back.codes[:400], codes)  # and out again into a wire bank


@pytest.mark.parametrize("bank_file_bytes", [0, 1])  # banks inline / in shared bank files
def test_clients_see_wire_codes_across_writes_snapshots_and_restarts(
        tmp_path: Path, bank_file_bytes: int) -> None:
    codec = load_codec(str(TEXT_MODEL), "cpu")
    x = _unit(40, 384, 6).numpy().reshape(40, 1, 384)
    expected = codec.decompress(codec.compress(torch.from_numpy(x))).numpy()
    srv = start_text_server(tmp_path, snapshot_bank_file_bytes=bank_file_bytes)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            c.write(x[:20], mode="per_item", keys=[f"k{i}" for i in range(20)])
            c.create_snapshot("half")
            c.write(x[20:], mode="per_item", keys=[f"k{i}" for i in range(20, 40)])
            wire = c.compress(x)
            c.create_bank("codes", 16)
            c.write(codes=wire[:5], mode="per_item", bank="codes")
    finally:
        srv.stop(grace=0.5)
    # the snapshot, then the log's later writes
    srv = start_text_server(tmp_path, snapshot_bank_file_bytes=bank_file_bytes)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            hits = c.read(x, top_k=1, reconstruct=True, count_access=False)
            for i, per_query in enumerate(hits):
                assert per_query.hits[0].key == f"k{i}"
                np.testing.assert_allclose(per_query.hits[0].reconstruction.reshape(-1),
                                           expected[i].reshape(-1), atol=1e-6)
            own = c.read(x[:5], bank="codes", top_k=1, reconstruct=True)
            for i, per_query in enumerate(own):
                np.testing.assert_allclose(per_query.hits[0].reconstruction.reshape(-1),
                                           expected[i].reshape(-1), atol=1e-6)
    finally:
        srv.stop(grace=0.5)
