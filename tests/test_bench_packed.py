"""``apcm bench read`` and ``apcm bench recall`` over packed (IDRP v2) codes, on small
inputs: the FAISS twin over the decoded vectors agrees with Read's top hit, Read
through the real server ranks as the decoded memories do, and missing data is
refused with a message that says how to build it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apcm.server.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT_V2_MODEL = ROOT / "model_weights" / "text-minilm.safetensors"
TEXT_V2_FIXTURE = ROOT / "tests" / "fixtures" / "text_v2_heldout.safetensors"


def test_bench_read_compares_packed_banks_with_faiss_at_the_same_bytes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js = tmp_path / "read.json"
    rc = main(["bench", "read", "--model", str(TEXT_V2_MODEL), "--sizes", "3000",
               "--batches", "1,4", "--repeats", "3", "--train-size", "2000",
               "--twins", "sq,flat", "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["code_dtype"] == "uint8" and result["code_dim"] == 192
    twins = {r["twin"] for r in result["rows"]}
    assert len(twins) == 2 and any("SQ4" in t for t in twins)
    for row in result["rows"]:
        assert row["slots"] == 3000 and row["ours_p50_ms"] > 0 and row["faiss_p50_ms"] > 0
        if "decoded" in row["twin"]:  # the float twin ranks exactly as Read does
            assert row["top1_agreement"] == 1.0 and row["faiss_bytes_per_slot"] == 1536
        else:
            assert row["faiss_bytes_per_slot"] == row["raw_code_bytes"] == 192
    assert result["goals"][0]["met"] is False  # 3,000 slots are not the 1M the goal names
    assert "Read over packed codes" in capsys.readouterr().out


def test_bench_recall_read_over_grpc_ranks_like_the_decoded_memories(tmp_path: Path) -> None:
    js = tmp_path / "recall.json"
    rc = main(["bench", "recall", "--model", str(TEXT_V2_MODEL), "--data", str(TEXT_V2_FIXTURE),
               "--sets", "test,licenses", "--queries", "30", "--no-baselines",
               "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    reads = [r for r in result["rows"] if "Read over gRPC" in r["method"]]
    assert [r["set"] for r in reads] == ["test", "licenses"]
    for read in reads:
        decoded = next(r for r in result["rows"]
                       if r["set"] == read["set"] and "decoded memories" in r["method"])
        assert read["n_memories"] == (270 if read["set"] == "test" else 70)
        assert read["recall_at_10"] == pytest.approx(decoded["recall_at_10"], abs=0.01)
        assert read["same_top10_as_decoded"] >= 0.9
        assert 0.8 < read["recall_at_10"] <= 1.0
    assert {g["goal"].split(":")[0] for g in result["goals"]} >= {"test", "licenses"}


def test_bench_recall_reads_banks_with_their_own_codec_beside_in_domain_baselines(
        tmp_path: Path) -> None:
    js = tmp_path / "recall-own.json"
    rc = main(["bench", "recall", "--model", str(TEXT_V2_MODEL), "--data", str(TEXT_V2_FIXTURE),
               "--sets", "test", "--queries", "30", "--train-key", "fortunes", "--no-opq",
               "--fit-in-domain", "--bank-codec-threshold", "200", "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["benchmark"] == "recall-own-test-192B"
    methods = [r["method"] for r in result["rows"]]
    (own,) = [r for r in result["rows"] if "bank's own codec" in r["method"]]
    # 270 mixed sentences in 384 dims: the fit ran, and was adopted or declined
    assert "own, fitted on" in own["method"] or "1 fit(s) declined" in own["method"]
    assert own["self_hit"] > 0.9 and 0.9 < own["mean_cosine"] <= 1.0
    assert any(m.endswith("(fit: in domain)") for m in methods)
    assert any(m.startswith("FAISS PQ") and "in domain" not in m for m in methods)
    assert {g["goal"] for g in result["goals"]} >= {
        "test: own-codec mean cosine >= 0.997",
        "test: own-codec Read recall@10 >= the best baseline fitted in domain"}


def test_bench_recall_says_how_to_build_missing_data(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="scripts/prepare_corpus.py"):
        main(["bench", "recall", "--data", str(tmp_path / "nothing.safetensors")])
    with pytest.raises(SystemExit, match="no tensor"):
        main(["bench", "recall", "--data", str(TEXT_V2_FIXTURE), "--sets", "test,jokes"])


def test_bench_restart_brings_the_index_back_and_shares_the_unchanged_bank(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js = tmp_path / "restart.json"
    rc = main(["bench", "restart", "--memories", "3000", "--tail", "100",
               "--bank-file-bytes", "1", "--dir", str(tmp_path), "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    restart = next(r for r in result["rows"] if r["what"].startswith("restart"))
    assert "index ready" in restart["note"] and "1 log records replayed" in restart["note"]
    assert result["ratio"] > 0
    shared = result["goals"][1]
    assert shared["met"] and "untouched" in shared["measured"]
    assert "restart / raw read:" in capsys.readouterr().out
    assert not any(tmp_path.glob("apcm-bench-restart-*"))  # its data dir is removed
