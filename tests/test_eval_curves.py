"""Equal-bytes baselines, rate–distortion curves (``apcm eval --budgets``) and
``apcm bench codec`` on small real data: scikit-learn digits and the committed
held-out fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from apcm.server.cli import main
from apcm.tools.evaluation import curves, metrics, report, transform
from apcm.tools.evaluation.baselines import (
    IN_DOMAIN_IDRP,
    FaissSQMethod,
    RaBitQMethod,
    RandomRotationMethod,
    WaterFillingMethod,
    rabitq_config,
)
from apcm.tools.evaluation.datasets import corpus_splits

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "model_weights" / "digits.safetensors"
DIGITS_FIXTURE = ROOT / "tests" / "fixtures" / "digits_heldout.safetensors"
TEXT_FIXTURE = ROOT / "tests" / "fixtures" / "text_heldout.safetensors"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    x = x[np.random.default_rng(0).permutation(len(x))]
    return x[:600], x[1200:]  # 600 training items keep the k-means fits short


def _code_bytes(codes: np.ndarray) -> float:
    return codes.nbytes / codes.shape[0]


def test_every_baseline_spends_exactly_its_budget_and_more_bytes_help(
        digits: tuple[np.ndarray, np.ndarray]) -> None:
    x_train, x_test = digits
    mse: dict[str, dict[int, float]] = {}
    for budget in (16, 32):
        methods, skipped = report.budget_baselines(budget, x_train, (8, 8), opq=budget == 32)
        families = {m.family for m in methods}
        assert {"PCA int8", "FAISS PQ", "FAISS SQ8", "FAISS SQ4", "FAISS RaBitQ",
                "water-filling TC", "random rotation + uniform SQ"} <= families
        assert ("FAISS OPQ+PQ" in families) == (budget == 32)
        for m in methods:
            codes = m.encode(x_test)
            if m.family == "FAISS RaBitQ":  # search only; its code fits within the budget
                assert _code_bytes(codes) == m.bytes_per_code <= budget
                continue
            assert _code_bytes(codes) == m.bytes_per_code == budget, m.name
            err = metrics.mse(x_test, m.decode(codes).astype(np.float64))
            mse.setdefault(m.family, {})[budget] = err
        assert all("n/a" in s for s in skipped)
    for family, by_budget in mse.items():  # twice the bytes, less error, for every method
        if len(by_budget) == 2:
            assert by_budget[32] < by_budget[16], family
    # at the same 64 dims, 8 bits per value beat 4 bits per value
    sq8 = FaissSQMethod(8, 64, x_train)
    sq4 = FaissSQMethod(4, 32, x_train)
    assert metrics.mse(x_test, sq8.decode(sq8.encode(x_test))) < \
        metrics.mse(x_test, sq4.decode(sq4.encode(x_test))) / 10


def test_rabitq_behind_its_rotation_fills_the_budget_and_beats_the_unrotated_one() -> None:
    import faiss

    rng = np.random.default_rng(0)
    d = 64
    # axis-aligned variances falling by 0.85 per dim, as on PCA axes
    x = (rng.standard_normal((1200, d)) * 0.85 ** np.arange(d)).astype(np.float32)
    exact = metrics.top_k_cosine(x, x, 10)
    # 16 B: 1 bit on all 64 dims (the rotation is the only difference); 40 B: 3 bits on
    # the leading 52 PCA axes
    for budget, dims, margin in ((16, 64, 0.1), (40, 52, 0.0)):
        nb, found = rabitq_config(d, budget)  # type: ignore[misc]
        assert found == dims
        size = faiss.IndexRaBitQ(dims, faiss.METRIC_INNER_PRODUCT, nb).code_size
        bigger = faiss.IndexRaBitQ(dims + 1, faiss.METRIC_INNER_PRODUCT, nb).code_size
        assert size <= budget < bigger or dims == d
        recall = {}
        for rotate in (False, True):
            m = RaBitQMethod(budget, x[:800], rotate=rotate)
            assert m.bytes_per_code == size == _code_bytes(m.encode(x))
            recall[rotate] = metrics.search_recall_at_k(m.search, x, 10, exact)
        assert recall[True] >= recall[False] + margin, (budget, recall)


def test_water_filling_beats_pca_int8_on_held_out_text() -> None:
    f = load_file(str(TEXT_FIXTURE))
    x_train, x_ood = f["test"].reshape(-1, 384), f["ood"].reshape(-1, 384)
    for budget in (48, 96):
        methods, _ = report.budget_baselines(budget, x_train, (1, 384), faiss=False)
        pca8 = next(m for m in methods if m.family == "PCA int8")
        wf = next(m for m in methods if isinstance(m, WaterFillingMethod))
        err = {m.name: metrics.mse(x_ood, m.decode(m.encode(x_ood)).astype(np.float64))
               for m in (pca8, wf)}
        assert err[wf.name] < 0.8 * err[pca8.name], err
        assert wf.bits.sum() == 8 * budget and wf.bits.max() <= 8


def test_random_rotation_spreads_the_bits_evenly() -> None:
    x = np.random.default_rng(1).standard_normal((500, 10)).astype(np.float32)
    rr = RandomRotationMethod(3, x)  # 24 bits over 10 dims: 3,3,3,3,2,...
    assert sorted(rr.bits.tolist()) == [2] * 6 + [3] * 4
    assert rr.encode(x).shape == (500, 3)


def test_bit_packing_and_allocation_are_exact() -> None:
    rng = np.random.default_rng(0)
    bits = np.array([0, 1, 3, 8, 5, 3, 0, 7])
    codes = np.stack([rng.integers(0, 1 << b, 50) if b else np.zeros(50, int) for b in bits],
                     axis=1)
    packed = transform.pack(codes, bits)
    assert packed.shape == (50, 4) and packed.dtype == np.uint8  # 27 bits -> 4 bytes
    assert np.array_equal(transform.unpack(packed, bits), codes)
    var = np.array([4.0, 1.0, 0.25, 0.01])
    alloc = transform.allocate_bits(var[:, None] * transform.gauss_mse(np.arange(9)), 6)
    assert alloc.sum() == 6 and list(alloc) == sorted(alloc, reverse=True)


def test_corpus_splits_are_stratified_and_keep_ood_whole() -> None:
    rng = np.random.default_rng(0)
    src = {name: rng.standard_normal((n, 4)).astype(np.float32)
           for name, n in (("a", 100), ("b", 50), ("fortunes", 30))}
    out = corpus_splits(src, ("fortunes",))
    assert {k: len(v) for k, v in out.items()} == {"train": 105, "val": 15, "test": 30,
                                                   "fortunes": 30}
    again = corpus_splits(src, ("fortunes",))
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_curves_fit_every_baseline_on_train_and_in_domain(
        digits: tuple[np.ndarray, np.ndarray]) -> None:
    import torch

    from apcm.server.codecs.idrp.v2 import TransformCodec

    x_train, x_test = digits
    result = curves.run_curves([], [16, 32], x_train, {"test": x_test}, (8, 8),
                               embeddings=True, opq=False, renorm={32: True},
                               timing_s=0.01, log=lambda _: None)
    rows = result["rows"]
    assert {r["fit"] for r in rows} == {"train", "in domain"}
    assert result["fits"] == ["train", "in domain"]
    for budget in (16, 32):
        fams = {r["family"] for r in rows if r["budget"] == budget}
        trained = {f.removesuffix(" (fit: train)") for f in fams if f.endswith("(fit: train)")}
        domain = {f.removesuffix(" (fit: in domain)") for f in fams
                  if f.endswith("(fit: in domain)")}
        assert trained == domain and {"FAISS PQ", "FAISS RaBitQ", "PCA float32"} <= trained
        ours = [r for r in rows if r["family"] == IN_DOMAIN_IDRP and r["budget"] == budget]
        assert len(ours) == 1 and ours[0]["bytes_per_code"] == budget
        assert ours[0]["fit"] == "in domain"

    def mse(family: str, budget: int) -> float:
        return next(r["mse"] for r in rows if r["family"] == family and r["budget"] == budget)

    # PCA fitted on the items it codes has the least squared error of any m-dim projection
    assert mse("PCA float32 (fit: in domain)", 16) < mse("PCA float32 (fit: train)", 16)
    # our in-domain row is exactly TransformCodec.fit on the split, with the given renorm
    # (renorm on these non-unit digits is a large error, so the setting is visible)
    items = torch.from_numpy(x_test).reshape(-1, 8, 8)
    fitted = {}
    for budget, renorm in ((16, None), (32, True), (32, False)):
        codec = TransformCodec.fit(items, budget, renorm=renorm, hedge=0.0, rotate_groups=False)
        x_hat = codec.decompress(codec.compress(items)).reshape(len(x_test), -1).numpy()
        fitted[(budget, renorm)] = metrics.mse(x_test, x_hat.astype(np.float64))
    assert mse(IN_DOMAIN_IDRP, 16) == pytest.approx(fitted[(16, None)], rel=1e-9)
    assert mse(IN_DOMAIN_IDRP, 32) == pytest.approx(fitted[(32, True)], rel=1e-9)
    assert fitted[(32, True)] > 10 * fitted[(32, False)]


def test_budgets_from_ratios() -> None:
    assert curves.parse_budgets(None, "32,16,8,4", 1536) == [48, 96, 192, 384]
    assert curves.parse_budgets("96,48", None, 1536) == [48, 96]
    with pytest.raises(ValueError):
        curves.parse_budgets(None, "7", 1536)


def test_eval_budgets_writes_tables_and_plots(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, js = tmp_path / "rd.md", tmp_path / "rd.json"
    rc = main(["eval", "--model", str(DIGITS_MODEL), "--model", str(DIGITS_MODEL),
               "--data", str(DIGITS_FIXTURE), "--train-key", "test", "--splits", "test",
               "--image", "--embeddings", "--budgets", "16,32", "--no-opq", "--timing-s", "0.01",
               "--plots", str(tmp_path), "--plot-prefix", "dg", "--out", str(out),
               "--json", str(js)])
    assert rc == 0
    text = out.read_text()
    assert "**PSNR dB**" in text and "**recall@10" in text and "| 16 B | 32 B |" in text
    assert "| digits (idrp int8 m=32, this model) | 32 | 8:1 |" in text
    assert "water-filling TC" in text and "FAISS SQ4" in text and "FAISS RaBitQ" in text
    assert "| FAISS PQ (fit: train) |" in text and "| FAISS PQ (fit: in domain) |" in text
    assert "| FAISS RR+RaBitQ 1-bit (fit: in domain) | 16 |" in text
    assert f"| {IN_DOMAIN_IDRP} |" in text
    rows = json.loads(js.read_text())["rows"]
    assert {r["budget"] for r in rows} == {16, 32}
    assert {r["fit"] for r in rows} == {"model", "train", "in domain"}
    for metric in ("psnr", "mse", "cosine", "recall10"):
        png = tmp_path / f"dg.{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"![dg.{metric}](dg.{metric}.png)" in text
    capsys.readouterr()


def test_bench_codec_prints_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js = tmp_path / "codec.json"
    rc = main(["bench", "codec", "--model", str(DIGITS_MODEL), "--data", str(DIGITS_FIXTURE),
               "--split", "test", "--batch", "256", "--repeats", "2", "--json", str(js)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ours encode+decode / PQ encode = " in printed and "PQ32x8" in printed
    result = json.loads(js.read_text())
    assert result["benchmark"] == "codec" and result["model"]["bytes_per_code"] == 32
    assert {r["op"] for r in result["rows"]} >= {"ours encode", "FAISS PQ encode"}
    assert result["ratios"]["ours_encode_plus_decode_over_pq_encode"] > 0
    assert result["goals"][0]["met"] in (True, False)


def test_curves_and_bench_take_any_codec_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from apcm.server.codecs.base import save_codec
    from apcm.server.codecs.pca import PCACodec

    items = torch.from_numpy(load_file(str(DIGITS_FIXTURE))["test"]).float()
    path = tmp_path / "pca16.safetensors"
    save_codec(PCACodec.fit(items, 16, "int8"), path)
    out = tmp_path / "rd.md"
    assert main(["eval", "--model", str(path), "--model", str(DIGITS_MODEL),
                 "--data", str(DIGITS_FIXTURE), "--train-key", "test", "--splits", "test",
                 "--image", "--ratios", "16", "--no-faiss", "--timing-s", "0.01",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "| pca16 (pca int8 m=16, this model) | 16 | 16:1 |" in text
    assert "| pca (model) |" in text and "| idrp (model) |" in text  # its own 32 B point
    assert main(["bench", "codec", "--model", str(path), "--data", str(DIGITS_FIXTURE),
                 "--split", "test", "--batch", "64", "--repeats", "1"]) == 0
    assert "PQ16x8" in capsys.readouterr().out
