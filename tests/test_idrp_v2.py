"""IDRP v2 (transform code): the untrained model is exactly the classical transform
coder (checked against an independent numpy implementation), codes are exactly
``budget`` bytes, the flow is a bijection with the right log-det on perturbed
weights, files round-trip, and banks rank by the exact cosine of decoded items."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from float_bounds import (
    assert_within_bound,
    float32_cosine_bound,
    float32_dot_bound,
    float32_mix_bound,
    float32_softmax_bound,
)

from apcm.server.codecs.base import load_codec, save_codec
from apcm.server.codecs.idrp import transform
from apcm.server.codecs.idrp.v2 import TransformCodec
from apcm.server.codecs.idrp.v2model import TransformConfig, TransformIDRP
from apcm.server.memory.bank import MemoryBank
from apcm.server.memory.eviction import make_policy
from apcm.server.memory.options import ReadOptions

D, BUDGET = 12, 4


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """Anisotropic, non-Gaussian, correlated data: train / val / test."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((D, D))
    scales = np.geomspace(3.0, 0.02, D)

    def draw(n: int) -> np.ndarray:
        z = rng.standard_normal((n, D)) * scales
        z[:, 1] = np.abs(z[:, 1])  # skewed
        return (z @ mix + 0.5).astype(np.float32)

    return {"train": draw(3000), "val": draw(500), "test": draw(400)}


@pytest.fixture(scope="module")
def codec(data: dict[str, np.ndarray]) -> TransformCodec:
    return TransformCodec.fit(torch.from_numpy(data["train"])[:, None, :], BUDGET,
                              val=torch.from_numpy(data["val"])[:, None, :])


# ----------------------------------------------------------------- independent reference
def _ref_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov((x - mean).T))
    rot = evecs[:, np.argsort(-evals)].T
    for i in range(len(rot)):  # sign: each row's largest |entry| positive
        rot[i] *= np.sign(rot[i][np.argmax(np.abs(rot[i]))])
    return mean, rot


def _ref_cells(z: np.ndarray, step: float, b: int) -> np.ndarray:
    n = 2**b
    return np.minimum(np.maximum(np.floor(z / step + n / 2), 0), n - 1).astype(np.int64)


def _ref_centroid_mse(z: np.ndarray, step: float, b: int) -> float:
    cells = _ref_cells(z, step, b)
    return sum(float(((z[cells == c] - z[cells == c].mean()) ** 2).sum())
               for c in np.unique(cells)) / len(z)


def _ref_allocate(dist: np.ndarray, total: int) -> list[int]:
    @functools.cache
    def best(i: int, left: int) -> tuple[float, tuple[int, ...]]:
        if i == len(dist):
            return (0.0, ()) if left == 0 else (math.inf, ())
        options = []
        for b in range(min(8, left) + 1):
            cost, rest = best(i + 1, left - b)
            options.append((dist[i, b] + cost, (b, *rest)))
        return min(options, key=lambda o: o[0])

    return list(best(0, total)[1])


FACTORS = np.exp(np.linspace(np.log(0.6), np.log(1.6), 15))


def _ref_step(col: np.ndarray, b: int) -> tuple[float, float]:
    """(step, centroid MSE) of the best of the 15 step factors for one column."""
    errs = [_ref_centroid_mse(col, transform.gauss_step(b) * col.std() * g, b) for g in FACTORS]
    k = int(np.argmin(errs))
    return transform.gauss_step(b) * col.std() * FACTORS[k], errs[k]


def _ref_group_rotation(bits: np.ndarray, seed: int) -> np.ndarray:
    rot = np.eye(len(bits))
    rng = np.random.default_rng(seed)
    for w in sorted(set(bits[bits > 0].tolist())):
        idx = [i for i in range(len(bits)) if bits[i] == w]
        if len(idx) > 1:
            q, r = np.linalg.qr(rng.standard_normal((len(idx), len(idx))))
            for a, i in enumerate(idx):
                for c, j in enumerate(idx):
                    rot[i, j] = q[a, c] * (1.0 if r[c, c] > 0 else -1.0)
    return rot


def _ref_fit(train: np.ndarray, budget: int, hedge: float = 0.0,
             rotate: bool = False) -> dict[str, np.ndarray]:
    """PCA + per-dim step search + exact allocation + centroid tables, from the spec;
    with ``hedge``, allocation and steps as if var_i were (1 - h) var_i + h mean(var);
    with ``rotate``, each equal-width group turned by a seeded random rotation."""
    x = train.astype(np.float64)
    mean, rot = _ref_pca(x)
    z = (x - mean) @ rot.T
    sub = z[np.random.default_rng(0).permutation(len(z))[:8000]]
    steps = np.zeros((D, 9))
    dist = np.zeros((D, 9))
    dist[:, 0] = (sub**2).mean(0)
    for i in range(D):
        for b in range(1, 9):
            steps[i, b], dist[i, b] = _ref_step(sub[:, i], b)
    var = sub.var(0)
    ratio = ((1 - hedge) * var + hedge * var.mean()) / var
    bits = np.array(_ref_allocate(dist * ratio[:, None], 8 * budget))
    steps *= np.sqrt(ratio)[:, None]
    if rotate:
        group = _ref_group_rotation(bits, 0)
        rot, z, sub = group @ rot, z @ group.T, sub @ group.T
        var = sub.var(0)
        ratio = ((1 - hedge) * var + hedge * var.mean()) / var
        for i in range(D):
            if bits[i] > 0:
                steps[i, bits[i]] = _ref_step(sub[:, i], int(bits[i]))[0] * np.sqrt(ratio[i])
    tables = []
    z32 = z.astype(np.float32)
    for i in range(D):
        b = int(bits[i])
        if b == 0:
            tables.append(np.zeros(1))
            continue
        step = np.float32(steps[i, b])
        cells = _ref_cells(z32[:, i], step, b)
        mids = (np.arange(2**b) + 0.5 - 2**b / 2) * step
        sums = np.array([z32[cells == c, i].astype(np.float64).sum() for c in range(2**b)])
        counts = np.array([(cells == c).sum() for c in range(2**b)])
        tables.append((sums + 2 * mids) / (counts + 2))
    return {"mean": mean, "rot": rot, "steps": steps, "dist": dist, "bits": bits,
            "tables": tables}


def _ref_encode(ref: dict, x: np.ndarray) -> np.ndarray:
    z = (x.astype(np.float64) - ref["mean"]) @ ref["rot"].T
    fields = []
    for w in sorted(set(ref["bits"][ref["bits"] > 0].tolist())):
        for i in np.flatnonzero(ref["bits"] == w):
            cells = _ref_cells(z[:, i], np.float32(ref["steps"][i, w]), w)
            fields.append((cells[:, None] >> np.arange(w - 1, -1, -1)) & 1)
    return np.packbits(np.concatenate(fields, axis=1).astype(np.uint8), axis=1)


def _ref_decode(ref: dict, codes: np.ndarray, renorm: bool) -> np.ndarray:
    bitsv = np.unpackbits(codes, axis=1)
    z = np.zeros((len(codes), D))
    pos = 0
    for w in sorted(set(ref["bits"][ref["bits"] > 0].tolist())):
        for i in np.flatnonzero(ref["bits"] == w):
            cells = bitsv[:, pos:pos + w].astype(np.int64) @ (1 << np.arange(w - 1, -1, -1))
            z[:, i] = ref["tables"][i][cells]
            pos += w
    x = z @ ref["rot"] + ref["mean"]
    return x / np.linalg.norm(x, axis=1, keepdims=True) if renorm else x


# ----------------------------------------------------------------- the init
@pytest.mark.parametrize(("hedge", "rotate"), [(0.0, False), (0.5, False), (0.3, True)])
def test_untrained_model_equals_the_classical_transform_coder(
        codec: TransformCodec, data: dict[str, np.ndarray], hedge: float, rotate: bool) -> None:
    if hedge or rotate:
        codec = TransformCodec.fit(torch.from_numpy(data["train"])[:, None, :], BUDGET,
                                   val=torch.from_numpy(data["val"])[:, None, :],
                                   hedge=hedge, rotate_groups=rotate)
    ref = _ref_fit(data["train"], BUDGET, hedge, rotate)
    model = codec.model
    np.testing.assert_array_equal(model.bits.numpy(), ref["bits"])
    assert int(model.bits.sum()) == 8 * BUDGET
    got = np.sum(ref["dist"][np.arange(D), model.bits.numpy()])
    assert got == pytest.approx(min(np.sum(ref["dist"][np.arange(D), ref["bits"]]), got))
    x = torch.from_numpy(data["test"])[:, None, :]
    codes = codec.compress(x)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (len(x), BUDGET)
    np.testing.assert_array_equal(codes.numpy(), _ref_encode(ref, data["test"]))
    decoded = codec.decompress(codes)[:, 0].numpy()
    np.testing.assert_allclose(decoded, _ref_decode(ref, codes.numpy(), codec.model.config.renorm),
                               atol=2e-5)
    # the whole latent is coded or predicted: no dim silently dropped from the budget
    assert codec.bytes_per_code == BUDGET and codec.compression_ratio == D * 4 / BUDGET


def test_allocation_is_exact_on_a_non_convex_problem() -> None:
    rng = np.random.default_rng(1)
    dist = rng.random((6, 9)) * np.linspace(3, 0.1, 6)[:, None]
    for total in (0, 5, 13, 30, 48):
        bits = transform.allocate_bits(dist, total)
        ref = _ref_allocate(dist, total)
        assert bits.sum() == total
        assert dist[np.arange(6), bits].sum() == pytest.approx(dist[np.arange(6), ref].sum())


def test_packing_round_trips_and_matches_packbits_order() -> None:
    gen = torch.Generator().manual_seed(0)
    bits = torch.tensor([3, 0, 8, 1, 5, 7, 0, 2, 6, 4])  # 36 bits: pad to 40 with a 4
    bits = torch.cat([bits, torch.tensor([4])])
    dim, shift = transform.bit_layout(bits)
    cells = torch.stack([torch.randint(0, max(1 << int(b), 1), (50,), generator=gen)
                         if b else torch.zeros(50, dtype=torch.int64) for b in bits], dim=1)
    packed = transform.pack(cells, dim, shift)
    assert tuple(packed.shape) == (50, int(bits.sum()) // 8)
    assert torch.equal(transform.unpack(packed, dim, shift, len(bits)), cells)
    fields = [(cells[:, i, None].numpy() >> np.arange(w - 1, -1, -1)) & 1
              for w in sorted(set(bits.tolist()) - {0})
              for i in np.flatnonzero(bits.numpy() == w)]
    want = np.packbits(np.concatenate(fields, axis=1).astype(np.uint8), axis=1)
    np.testing.assert_array_equal(packed.numpy(), want)


# ----------------------------------------------------------------- flow and predictor
def _perturbed(d: int = 6, blocks: int = 2) -> TransformIDRP:
    torch.manual_seed(0)
    model = TransformIDRP(TransformConfig(dim=d, budget=2, n_blocks=blocks, hidden=16,
                                          aux_hidden=8))
    model.set_sigma(torch.linspace(2.0, 0.3, d))
    model = model.double()
    rot, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    model.rotation.rotation.copy_(rot)
    model.rotation.mean.copy_(torch.randn(d))
    with torch.no_grad():
        for p in model.flow_layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_flow_round_trip_on_perturbed_weights() -> None:
    model = _perturbed()
    x = torch.randn(32, 6, dtype=torch.float64)
    y, _ = model(x)
    assert not torch.allclose(y, model.rotation(x)[0])  # the couplings do something
    torch.testing.assert_close(model.inverse(y), x, atol=1e-10, rtol=0)


def test_flow_log_det_matches_the_jacobian() -> None:
    model = _perturbed()
    for x in torch.randn(4, 6, dtype=torch.float64):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x)
        _, log_det = model(x[None])
        assert float(log_det.detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]),
                                                        abs=1e-9)
        jac_inv = torch.autograd.functional.jacobian(lambda v: model.inverse(v[None])[0],
                                                     model(x[None])[0][0])
        assert float(torch.linalg.slogdet(jac_inv)[1]) == pytest.approx(-float(log_det.detach()),
                                                                        abs=1e-9)


def test_flow_is_identity_at_init_and_predictor_predicts_zero(
        data: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(data["train"])[:, None, :]
    plain = TransformCodec.fit(x, BUDGET, renorm=False)
    flowed = TransformCodec.fit(x, BUDGET, renorm=False, n_blocks=2, aux_hidden=8)
    test = torch.from_numpy(data["test"])[:, None, :]
    assert torch.equal(plain.compress(test), flowed.compress(test))
    torch.testing.assert_close(plain.decompress(plain.compress(test)),
                               flowed.decompress(flowed.compress(test)), atol=1e-5, rtol=0)


def test_aux_predictor_restores_the_uncoded_dims(data: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(data["train"])[:, None, :]
    codec = TransformCodec.fit(x, 2, renorm=False, aux_hidden=8)
    model = codec.model
    assert model.predictor is not None and len(model.uncoded) > 0
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    codes = codec.compress(torch.from_numpy(data["test"])[:, None, :])
    y = codec.codes_to_latent(codes)
    torch.testing.assert_close(y[:, model.uncoded], model.predictor(y[:, model.coded]))


# ----------------------------------------------------------------- file format
def test_file_round_trip_keeps_codes_and_hash(codec: TransformCodec, tmp_path,
                                              data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "v2.safetensors"
    digest = save_codec(codec, path)
    loaded = load_codec(path)
    assert isinstance(loaded, TransformCodec) and loaded.content_hash == digest
    assert loaded.code_dtype == "uint8" and loaded.code_dim == BUDGET
    x = torch.from_numpy(data["test"])[:, None, :]
    assert torch.equal(loaded.compress(x), codec.compress(x))
    torch.testing.assert_close(loaded.decompress(loaded.compress(x)),
                               codec.decompress(codec.compress(x)))


# ----------------------------------------------------------------- search
def _bank(codec: TransformCodec, n: int) -> MemoryBank:
    return MemoryBank("v2", n, code_dim=codec.code_dim, code_dtype="uint8", scale=None,
                      device=torch.device("cpu"), policy=make_policy("lfu", 0.0),
                      max_payload_bytes=8, max_key_length=8, scorer=codec.scorer)


@pytest.mark.parametrize("n_blocks", [0, 2])
def test_bank_scores_are_cosine_of_decoded_items(data: dict[str, np.ndarray],
                                                 n_blocks: int) -> None:
    codec = TransformCodec.fit(torch.from_numpy(data["train"])[:, None, :], BUDGET,
                               renorm=False, n_blocks=n_blocks)
    if n_blocks:
        with torch.no_grad():
            for p in codec.model.flow_layers.parameters():
                p.add_(0.05 * torch.randn_like(p))
    items = torch.from_numpy(data["test"][:300])
    codes = codec.compress(items[:, None, :])
    bank = _bank(codec, 300)
    bank.apply_write(list(range(300)), codes, [None] * 300, [None] * 300, list(range(1, 301)))
    queries = torch.from_numpy(data["val"][:20])
    latents = codec.encode_latent(queries)
    result = bank.read(latents,
                       ReadOptions(top_k=10, temperature=0.5, soft=True, count_access=False))
    decoded = codec.decompress(codes)[:, 0].double()
    unit = torch.nn.functional.normalize
    cos = unit(queries.double(), dim=1) @ unit(decoded, dim=1).T
    # the read's float32 arithmetic starts from the search vectors (a rotation or the
    # flow away from the inputs): its scores are checked there, its ranking above
    search_q, search_v = codec.scorer.queries(latents), codec.scorer.codes(codes)
    search_cos = unit(search_q.double(), dim=1) @ unit(search_v.double(), dim=1).T
    cos_bound = float32_cosine_bound(search_q, search_v)
    weights, weight_bound = float32_softmax_bound(search_cos, cos_bound, 0.5)
    for q, res in enumerate(result.results):
        best = torch.argsort(cos[q], descending=True)[:10]
        assert {h.slot for h in res.hits} == set(best.tolist())
        slots = [h.slot for h in res.hits]
        assert_within_bound([h.score for h in res.hits], search_cos[q, slots],
                            cos_bound[q, slots], "scores")
        assert_within_bound([h.weight for h in res.hits], weights[q, slots],
                            weight_bound[q, slots], "weights")
    if n_blocks == 0:  # the soft mix maps back to the inputs' space exactly
        rotation = codec.model.rotation.rotation.double()
        mix = weights @ search_v.double()
        mix_bound = float32_mix_bound(weights, weight_bound, search_v)
        # to_input is one d-term product with the rotation, of a mix known to mix_bound
        rounding = float32_dot_bound(mix, rotation.T,
                                    magnitude=(mix.abs() + mix_bound) @ rotation.abs())
        assert_within_bound(codec.scorer.to_input(result.soft), mix @ rotation,
                            mix_bound @ rotation.abs() + rounding, "soft mix in input space")


def test_flow_training_never_ships_worse_than_the_init(data: dict[str, np.ndarray]) -> None:
    from apcm.tools.training.transform import FlowTrainConfig, train_flow

    train = torch.from_numpy(data["train"])[:, None, :]
    val = torch.from_numpy(data["val"])[:, None, :]
    init = TransformCodec.fit(train, BUDGET, val=val, renorm=False)
    codec, record = train_flow(init, train, val, FlowTrainConfig(
        n_blocks=2, hidden=16, aux_hidden=8, epochs=2, batch_size=128, lr=1e-3))
    assert len(record["history"]) == 3
    assert record["best_val_mse"] <= record["init_val_mse"]
    test = torch.from_numpy(data["test"])[:, None, :]
    err = float(((codec.decompress(codec.compress(test)) - test) ** 2).sum((1, 2)).mean())
    assert math.isfinite(err)
    if record["fallback_to_init"]:
        assert codec is init
    else:  # a trained flow still round-trips and is saved and served like the init
        assert len(codec.model.flow_layers) > 0
        x = test[:, 0]
        torch.testing.assert_close(codec.model.inverse(codec.model(x)[0]), x, atol=1e-4,
                                   rtol=0)


def test_checks_reuse_given_codes_and_equal_checks_that_encode(
    codec: TransformCodec, data: dict[str, np.ndarray]
) -> None:
    """Compress and per-item Write hand their codes to the checks; the result must be
    exactly what the checks compute when they encode the items themselves."""
    x = torch.from_numpy(data["test"][:64])[:, None, :]
    own = codec.check_items(x)
    reused = codec.check_items(x, codec.compress(x))
    for field in ("in_domain_percentile", "flagged", "norm_off", "reconstruction_error"):
        np.testing.assert_array_equal(getattr(own, field), getattr(reused, field))


# ----------------------------------------------------------------- robustness knobs
def test_group_rotation_turns_only_dims_of_equal_width() -> None:
    bits = np.array([3, 3, 0, 5, 3, 5, 1, 0])
    rot = transform.group_rotation(bits, seed=0)
    np.testing.assert_allclose(rot @ rot.T, np.eye(8), atol=1e-12)
    for i in range(8):
        for j in range(8):
            if bits[i] != bits[j] or bits[i] == 0 or bits[j] == 0:
                assert rot[i, j] == (1.0 if i == j else 0.0)
    # the 3-bit group is really mixed, not left as the identity
    assert abs(rot[0, 1]) > 1e-3 and abs(rot[1, 4]) > 1e-3


def test_hedge_spends_bits_on_dims_the_training_spectrum_starves(
        data: dict[str, np.ndarray]) -> None:
    train = torch.from_numpy(data["train"])[:, None, :]
    plain = TransformCodec.fit(train, BUDGET)
    hedged = TransformCodec.fit(train, BUDGET, hedge=0.9)
    assert int(hedged.model.bits.sum()) == int(plain.model.bits.sum()) == 8 * BUDGET
    # the spectrum spans 3 .. 0.02: plain coding leaves the tail uncoded, hedging codes more
    assert int((hedged.model.bits > 0).sum()) > int((plain.model.bits > 0).sum())
    assert int(hedged.model.bits.max()) < int(plain.model.bits.max())


def test_rotated_groups_keep_the_latent_search_exact(data: dict[str, np.ndarray]) -> None:
    codec = TransformCodec.fit(torch.from_numpy(data["train"])[:, None, :], BUDGET,
                               hedge=0.3, rotate_groups=True)
    rot = codec.model.rotation.rotation.double()
    np.testing.assert_allclose((rot @ rot.T).numpy(), np.eye(D), atol=1e-5)
    x = torch.from_numpy(data["test"][:50])[:, None, :]
    decoded = codec.decompress(codec.compress(x))[:, 0]
    via_latent = codec.scorer.to_input(codec.scorer.codes(codec.compress(x)))
    # same direction (decoding may renormalise; search is by cosine)
    unit = torch.nn.functional.normalize
    np.testing.assert_allclose(unit(via_latent, dim=1).numpy(), unit(decoded, dim=1).numpy(),
                               atol=1e-4)


def _unit_items(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 1, d] unit-norm items around a common direction, variance spectrum over three
    decades and three directions of none (as sentence embeddings have)."""
    spec = torch.logspace(0, -3, d)
    spec[-3:] = 0
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(9)))
    x = (torch.randn(n, d, generator=gen) * spec) @ basis.T + 2.0 * basis[:, 0]
    return (x / x.norm(dim=1, keepdim=True)).reshape(n, 1, d)


@pytest.mark.parametrize("budget", [64, 32, 8])
def test_random_unit_vectors_are_flagged_at_every_budget_in_domain_items_rarely(
        budget: int) -> None:
    """At ``budget == d`` every dim gets 8 bits, so the group rotation turns the whole
    latent; the score must still see that random unit vectors put energy where the
    training items have almost none (a diagonal Gaussian on the turned latent,
    nearly isotropic, flagged about 40 % of them here)."""
    d = 64
    gen = torch.Generator().manual_seed(1)
    train, val, test = (_unit_items(n, d, gen) for n in (6000, 1500, 1500))
    codec = TransformCodec.fit(train, budget, val=val, rotate_groups=True, hedge=0.05)
    if budget == d:
        assert torch.unique(codec.model.bits).tolist() == [8]
    noise = torch.randn(1000, d, generator=gen)
    noise = (noise / noise.norm(dim=1, keepdim=True)).reshape(-1, 1, d)
    assert codec.check_items(noise).flagged.all()
    assert codec.check_items(test).flagged.mean() <= 0.03
    for scale in (0.9, 1.1):
        checks = codec.check_items(test * scale)
        assert checks.norm_off.all() and checks.flagged.all()


def test_the_full_covariance_score_survives_a_file_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    train, val = _unit_items(3000, 32, gen), _unit_items(800, 32, gen)
    codec = TransformCodec.fit(train, 32, val=val, rotate_groups=True)
    path = tmp_path / "m.safetensors"
    save_codec(codec, path)
    loaded = load_codec(path)
    assert loaded.content_hash == codec.content_hash
    np.testing.assert_array_equal(loaded.check_items(val).in_domain_percentile,
                                  codec.check_items(val).in_domain_percentile)


def test_rescoring_a_diagonal_score_file_keeps_its_codes_and_flags_random_vectors(
        tmp_path: Path) -> None:
    """What ``scripts/train_v2_models.py --rescore`` does to a file fitted before the
    full-covariance score: same code bytes and decoded items, random vectors flagged."""
    d = 64
    gen = torch.Generator().manual_seed(4)
    train, val, test = (_unit_items(n, d, gen) for n in (6000, 1500, 1500))
    codec = TransformCodec.fit(train, d, val=val, rotate_groups=True, hedge=0.05)
    m = codec.model
    old = TransformConfig.from_dict({**m.config.to_dict(), "score_full_cov": False})
    diagonal = TransformIDRP(old, table_size=len(m.table))
    diagonal.set_quantizer(transform.QuantizerFit(m.bits.numpy(), m.step.numpy(),
                                                  m.table.numpy(), m.offset.numpy()))
    state = {k: v for k, v in m.state_dict().items() if k != "score_whiten"}
    diagonal.load_state_dict(state, strict=True)
    before = TransformCodec("old", (1, d), diagonal)
    before.calibrate(val)
    path = tmp_path / "old.safetensors"
    save_codec(before, path)
    loaded = load_codec(path)
    assert "score_full_cov" not in loaded.config()["idrp"]
    codes = loaded.compress(test)
    decoded = loaded.decompress(codes)
    noise = torch.randn(1000, d, generator=gen)
    noise = (noise / noise.norm(dim=1, keepdim=True)).reshape(-1, 1, d)
    assert not loaded.check_items(noise).flagged.all()
    loaded.rescore(train, val)
    save_codec(loaded, path)
    rescored = load_codec(path)
    assert torch.equal(rescored.compress(test), codes)
    assert torch.equal(rescored.decompress(codes), decoded)
    assert rescored.check_items(noise).flagged.all()
    assert rescored.check_items(test).flagged.mean() <= 0.03
