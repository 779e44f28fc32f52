"""Banks fit a codec of their own once they hold enough memories (``memory.bankcodec``,
``domain.bankcodecs``): staged items survive restarts, a fit is adopted only if it
codes held-out staged items clearly better, a refit follows drift, the swap
re-encodes every memory, and reads, restarts, snapshots and restores see one
consistent codec.

Banks here hold a narrow source: unit vectors in a random 24-dim subspace of the
384-d space, which a fit on a few hundred of them codes far better than the served
model; a second subspace is a drift away from it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT_MODEL, start_text_server
from prometheus_client import generate_latest
from safetensors.numpy import load_file

from apcm.client import MemoryClient
from apcm.client.types import BankCodec, BankInfo
from apcm.server.codecs.base import load_codec
from apcm.server.codecs.idrp.v2 import TransformCodec
from apcm.server.domain.bankcodecs import BankCodecFitter
from apcm.server.memory import export
from apcm.server.memory.store import MemoryStore

FIXTURES = Path(__file__).resolve().parent / "fixtures"
THRESHOLD = 400


def _narrow(n: int, basis_seed: int, seed: int) -> np.ndarray:
    """n unit vectors [n, 1, 384] in the 24-dim subspace ``basis_seed`` draws."""
    basis, _ = np.linalg.qr(np.random.default_rng(basis_seed).standard_normal((384, 24)))
    z = np.random.default_rng(seed).standard_normal((n, 24)) * np.linspace(2.0, 0.5, 24)
    x = z @ basis.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)[:, None, :]


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    """1,200 memories of one narrow source [N, 1, 384]."""
    return _narrow(1200, 1, 2)


@pytest.fixture(scope="module")
def text() -> np.ndarray:
    """1,212 held-out sentence embeddings of five registers [N, 1, 384]."""
    v2 = load_file(str(FIXTURES / "text_v2_heldout.safetensors"))
    v1 = load_file(str(FIXTURES / "text_heldout.safetensors"))
    parts = [v2["test"], v2["fortunes"], v2["licenses"], v1["test"], v1["ood"]]
    x = np.concatenate([p.reshape(-1, 384) for p in parts]).astype(np.float32)
    return x[np.random.default_rng(0).permutation(len(x))].reshape(-1, 1, 384)


def _serve(data_dir: Path, **overrides: object):
    return start_text_server(data_dir, embedder="none", bank_codec_threshold=THRESHOLD,
                             **overrides)


def _until(c: MemoryClient, bank: str, done: Callable[[BankCodec], bool]) -> BankInfo:
    """The bank's info once ``done(its codec)`` (fits run in the background)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = c.describe_bank(bank)
        if info.codec is not None and done(info.codec):
            return info
        time.sleep(0.1)
    raise AssertionError(f"bank {bank}: codec still {c.describe_bank(bank).codec}")


def _until_own(c: MemoryClient, bank: str) -> BankInfo:
    return _until(c, bank, lambda codec: codec.state == "own")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _all_hits(c: MemoryClient, q: np.ndarray, bank: str, n: int) -> list:
    return c.read(q, bank=bank, top_k=n, reconstruct=True, count_access=False)


def test_a_bank_fits_its_own_codec_past_the_threshold_and_reads_exactly_as_decoded(
        tmp_path: Path, items: np.ndarray) -> None:
    served = load_codec(str(TEXT_MODEL), "cpu")
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("small", 1000)
            c.write(items[:THRESHOLD - 1], bank="small", mode="per_item")
            small = c.describe_bank("small").codec
            assert small is not None and small.state == "staging"
            assert (small.staged, small.threshold) == (THRESHOLD - 1, THRESHOLD)

            c.create_bank("big", 1000)
            db = items[:600]
            for i in range(0, len(db), 100):
                c.write(db[i:i + 100], bank="big", mode="per_item",
                        keys=[f"k{j}" for j in range(i, i + 100)])
            info = _until_own(c, "big")
            assert info.codec is not None and info.codec.model_hash not in ("", served.content_hash)
            # judged on a held-out tenth, then fitted on all that was staged by then
            assert THRESHOLD <= info.codec.fitted_on <= 500
            assert info.codec.fitted_at > 0 and info.codec.declined == 0
            assert 0 < info.codec.held_out_mse < 0.1 * info.codec.replaced_mse
            assert info.occupied == 600 and info.code_dim == served.code_dim
            scraped = generate_latest(srv.service.metrics.registry).decode()
            for line in ('apcm_bank_codec_own{bank="big"} 1.0',
                         'apcm_bank_codec_own{bank="small"} 0.0',
                         f'apcm_bank_codec_staged_items{{bank="small"}} {THRESHOLD - 1}.0'):
                assert line in scraped

            q = items[600:650]
            hits = _all_hits(c, q, "big", 600)
            recon = {h.slot: h.reconstruction for h in hits[0].hits}
            assert len(recon) == 600
            slots = np.asarray(sorted(recon))
            decoded = np.stack([recon[s] for s in slots]).reshape(600, -1).astype(np.float64)
            flat_q = q.reshape(len(q), -1).astype(np.float64)
            cos = (flat_q / np.linalg.norm(flat_q, axis=1, keepdims=True)) @ \
                (decoded / np.linalg.norm(decoded, axis=1, keepdims=True)).T
            for qi, per_query in enumerate(hits):
                # Read ranks by the cosine of the query with each decoded memory
                got = [h.slot for h in per_query.hits[:10]]
                assert set(got) == set(slots[np.argsort(-cos[qi])[:10]].tolist())
                np.testing.assert_allclose([h.score for h in per_query.hits[:10]],
                                           cos[qi, np.searchsorted(slots, got)], atol=1e-5)
            # the memories it was fitted on decode closer than by the served model (at
            # 400 items in 384 dims the fit does not generalise: the threshold is larger)
            by_key = {h.key: h.reconstruction for h in hits[0].hits}
            fitted = db[:THRESHOLD]
            own = np.stack([by_key[f"k{j}"] for j in range(THRESHOLD)])
            shipped = served.decompress(served.compress(torch.from_numpy(fitted))).numpy()
            assert _cos(own, fitted).mean() > _cos(shipped, fitted).mean() + 1e-3
    finally:
        srv.stop(grace=0.5)


def test_staged_items_the_fit_and_later_writes_survive_restarts_and_restores(
        tmp_path: Path, items: np.ndarray) -> None:
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("b", 1000)
            c.write(items[:300], bank="b", mode="per_item")
            c.create_snapshot("staging")
    finally:
        srv.stop(grace=0.5)
    srv = _serve(tmp_path)  # staged items come back from the snapshot and the log
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            codec = c.describe_bank("b").codec
            assert codec is not None and (codec.state, codec.staged) == ("staging", 300)
            c.write(items[300:500], bank="b", mode="per_item")
            before = _until_own(c, "b")
            c.write(items[500:550], bank="b", mode="per_item")  # encoded by the own codec
            q = items[600:640]
            expected = _all_hits(c, q, "b", 20)
    finally:
        srv.stop(grace=0.5)
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            after = c.describe_bank("b")
            assert after.codec is not None and before.codec is not None
            assert after.codec.staged == 50  # the later writes, toward a refit
            assert dataclasses.replace(after.codec, staged=0) == before.codec
            assert after.occupied == 550
            got = _all_hits(c, q, "b", 20)
            for e, g in zip(expected, got, strict=True):
                assert [h.slot for h in g.hits] == [h.slot for h in e.hits]
                for he, hg in zip(e.hits, g.hits, strict=True):
                    np.testing.assert_array_equal(hg.reconstruction, he.reconstruction)
            c.restore_snapshot("staging")  # back to the served model, staging again
            codec = c.describe_bank("b").codec
            assert codec is not None and (codec.state, codec.staged) == ("staging", 300)
    finally:
        srv.stop(grace=0.5)


def test_codes_written_to_a_bank_with_its_own_codec_are_re_encoded(
        tmp_path: Path, items: np.ndarray) -> None:
    served = load_codec(str(TEXT_MODEL), "cpu")
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("b", 1000)
            c.write(items[:THRESHOLD], bank="b", mode="per_item")
            _until_own(c, "b")
            x = items[700:720]
            codes = c.compress(x)  # the served model's codes, as clients have them
            c.write(codes=codes, bank="b", mode="per_item", keys=[f"c{i}" for i in range(20)])
            # the same as writing what the served model decodes them to
            shipped = served.decompress(torch.from_numpy(codes)).numpy()
            c.write(shipped, bank="b", mode="per_item", keys=[f"x{i}" for i in range(20)])
            hits = c.read(codes=codes, bank="b", top_k=2, reconstruct=True)
            for i, per_query in enumerate(hits):
                assert {h.key for h in per_query.hits} == {f"c{i}", f"x{i}"}
                a, b = per_query.hits
                np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
                assert a.score == pytest.approx(b.score, abs=1e-6)
    finally:
        srv.stop(grace=0.5)


def test_banks_keep_the_served_model_when_fitting_is_off(
        tmp_path: Path, items: np.ndarray) -> None:
    srv = start_text_server(tmp_path, embedder="none", bank_codec_threshold=0)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=60.0) as c:
            c.create_bank("b", 1000)
            c.write(items[:500], bank="b", mode="per_item")
            codec = c.describe_bank("b").codec
            assert codec is not None and (codec.state, codec.staged) == ("served", 0)
    finally:
        srv.stop(grace=0.5)


def _store(fitter: BankCodecFitter) -> MemoryStore:
    served = fitter.served
    return MemoryStore(code_dim=served.code_dim, code_dtype=served.code_dtype, scale=None,
                       device=torch.device("cpu"), max_capacity=10_000, max_payload_bytes=64,
                       max_key_length=64, default_policy="lfu", default_half_life=100.0,
                       scorer=served.scorer.stored(), fitter=fitter)


def test_a_moved_bank_takes_its_codec_and_a_staging_bank_its_staged_items(
        items: np.ndarray) -> None:
    served = load_codec(str(TEXT_MODEL), "cpu")
    assert isinstance(served, TransformCodec)
    fitter = BankCodecFitter(served, THRESHOLD, 512)
    src, dst = _store(fitter), _store(fitter)
    flat = items.reshape(len(items), -1)
    for name, n in (("own", 500), ("staging", 200)):
        src.create_bank(name, 1000)
        codes = served.compress(torch.from_numpy(items[:n]))
        src.write(name, codes, [None] * n, [None] * n, items=flat[:n], generation=0)
    deadline = time.monotonic() + 120  # the write that reached the threshold started it
    while src.get("own").own_codec is None and time.monotonic() < deadline:
        time.sleep(0.05)
    state = src.export_state()
    dst.load_state(state)
    moved, origin = dst.get("own"), src.get("own")
    assert moved.own_codec is not None and origin.own_codec is not None
    assert moved.own_codec.codec.model_hash == origin.own_codec.codec.model_hash
    assert torch.equal(moved.codes[:500], origin.codes[:500])
    q = served.encode_latent(torch.from_numpy(flat[700:710]))
    own_q = origin.own_codec.codec.engine.encode_latent(items[700:710])
    assert not torch.allclose(q, own_q)  # the bank's space is not the served model's
    a, b = origin.read(own_q), moved.read(own_q)
    assert [[h.slot for h in r.hits] for r in a.results] == \
        [[h.slot for h in r.hits] for r in b.results]
    staged = dst.get("staging").staging
    assert staged is not None and staged.count == 200
    np.testing.assert_array_equal(staged.items[:200], flat[:200])


def test_staging_keeps_only_items_their_slots_still_hold(items: np.ndarray) -> None:
    served = load_codec(str(TEXT_MODEL), "cpu")
    assert isinstance(served, TransformCodec)
    store = _store(BankCodecFitter(served, THRESHOLD, 512))
    store.create_bank("b", 100)
    flat = items.reshape(len(items), -1)
    codes = served.compress(torch.from_numpy(items[:6]))
    keys: list[str | None] = ["a", "b", "c", "a", None, None]
    for i in range(6):  # key "a" written twice: its first item is stale
        store.write("b", codes[i:i + 1], [keys[i]], [None], items=flat[i:i + 1])
    store.delete("b", [], ["c"])
    bank = store.get("b")
    assert bank.staging is not None and bank.staging.count == 6
    live = bank.staging.live(bank.occupied, bank.sequences)
    # "a" (slot 0) rewritten by write 3, "c" (slot 2) deleted
    assert bank.staging.slots[live].tolist() == [1, 0, 3, 4]
    np.testing.assert_array_equal(bank.staging.items[live], flat[[1, 3, 4, 5]])
    exported = export.export(bank)[1]
    np.testing.assert_array_equal(exported["staged_items"], flat[[1, 3, 4, 5]])
    assert bank.stats().memory_bytes >= bank.staging.nbytes > 6 * 384 * 4


def test_a_fit_that_codes_held_out_items_no_better_is_declined(
        tmp_path: Path, text: np.ndarray) -> None:
    # 400 sentences of five registers: too few for 384 dims, and the served model
    # was fitted on such text
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("b", 2000)
            c.write(text[:THRESHOLD], bank="b", mode="per_item")
            codec = _until(c, "b", lambda codec: codec.declined > 0).codec
            assert codec is not None
            assert (codec.state, codec.declined, codec.staged, codec.model_hash) == \
                ("staging", 1, 0, "")
    finally:
        srv.stop(grace=0.5)


def test_a_bank_whose_memories_drift_refits_to_cover_both_sources(
        tmp_path: Path, items: np.ndarray) -> None:
    drifted = _narrow(600, 7, 8)  # another subspace
    srv = _serve(tmp_path)
    try:
        with MemoryClient(f"127.0.0.1:{srv.port}", timeout=120.0) as c:
            c.create_bank("b", 2000)
            c.write(items[:THRESHOLD], bank="b", mode="per_item",
                    keys=[f"a{i}" for i in range(THRESHOLD)])
            first = _until_own(c, "b").codec
            assert first is not None
            c.write(drifted[:THRESHOLD], bank="b", mode="per_item",
                    keys=[f"d{i}" for i in range(THRESHOLD)])
            codec = _until(c, "b", lambda codec: codec.model_hash != first.model_hash).codec
            assert codec is not None and codec.state == "own"
            assert codec.model_hash != first.model_hash
            assert codec.held_out_mse < 0.1 * codec.replaced_mse
            # both sources decode well now: each memory is its own best hit
            for src, prefix in ((items, "a"), (drifted, "d")):
                hits = c.read(src[:50], bank="b", top_k=1, reconstruct=True)
                assert [h.hits[0].key for h in hits] == [f"{prefix}{i}" for i in range(50)]
                recon = np.stack([h.hits[0].reconstruction for h in hits])
                assert _cos(recon, src[:50]).min() > 0.99
    finally:
        srv.stop(grace=0.5)

