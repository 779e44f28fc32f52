"""The shipped weights: each loads, is 8:1 in bytes, and beats (or, with the fallback
recorded, equals) PCA with the same m and code dtype on its committed held-out fixture.

The IDRP v1 models (``digits``, ``gravel-binary``, and ``text-minilm-v1``, the text
model before v2) are checked against PCA; the v2 text model (``text-minilm``) against
the numbers measured when it was built (``model_weights/text-minilm.eval.md``) on the
committed v2 fixture, and against PCA-int8 at equal bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apcm.server.codecs.base import load_codec
from apcm.server.codecs.idrp.codec import IDRPCodec
from apcm.server.codecs.idrp.v2 import TransformCodec
from apcm.server.codecs.pca import PCACodec, fit_pca
from apcm.server.codecs.quant import CodeQuantizer
from apcm.server.errors import ModelFileError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHIPPED = [
    ("gravel-binary", "gravel_heldout.safetensors", (16, 16)),
    ("digits", "digits_heldout.safetensors", (8, 8)),
    ("text-minilm-v1", "text_heldout.safetensors", (1, 384)),
]
V2_FIXTURE = "text_v2_heldout.safetensors"
# (file, bytes per code, fixture split, lowest mean cosine, highest mean ||x - x_hat||^2):
# bounds a little looser than what the fixture measured when the model was built.
V2_SHIPPED = [
    ("text-minilm", 192, "test", 0.9965, 0.0065),
    ("text-minilm", 192, "fortunes", 0.995, 0.0085),
    ("text-minilm", 192, "licenses", 0.996, 0.0065),
    ("text-minilm-4x", 384, "test", 0.9999, 0.00012),
    ("text-minilm-4x", 384, "fortunes", 0.9999, 0.00012),
    ("text-minilm-16x", 96, "test", 0.970, 0.06),
    ("text-minilm-16x", 96, "fortunes", 0.96, 0.08),
    ("text-minilm-32x", 48, "test", 0.90, 0.19),
    ("text-minilm-32x", 48, "fortunes", 0.87, 0.25),
    # fitted on the narrower corpus before chat/wnex joined it (not retrained since);
    # the fixture's test split now includes those registers
    ("text-minilm-flow", 192, "test", 0.996, 0.0078),
    ("text-minilm-flow", 192, "fortunes", 0.993, 0.012),
]
# Out-of-domain text (licences vs Python docs): IDRP measured worse than PCA there
# (+1.4 % MSE on the fixture's 256 items, +1.8 % on all 569; model_weights/README.md);
# this bounds the loss rather than hiding it.
OOD_TOLERANCE = 1.05


def pca_baseline(codec: IDRPCodec) -> PCACodec:
    """PCA-m at the model's code dtype, fitted on the model's own training split.

    The model's first layer *is* that PCA (float64 fit on the training split);
    its int8 scale was fitted on the training latents and stored by ``apcm train``.
    """
    rotation = codec.model.layers[0]
    scale = None
    if codec.code_dtype == "int8":
        scale = torch.tensor(json.loads(codec.extra_metadata["apcm.meta.pca_int8_scale"]))
    quantizer = CodeQuantizer(codec.code_dtype, scale)
    return PCACodec("pca", codec.input_shape, rotation.mean,
                    rotation.rotation[: codec.code_dim], quantizer)


def coded_mse(codec, x: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    return float(((codec.decompress(codec.compress(x)) - x) ** 2).mean())


def load_shipped(name: str, shape: tuple[int, int]) -> IDRPCodec:
    codec = load_codec(ROOT / "model_weights" / f"{name}.safetensors")
    assert isinstance(codec, IDRPCodec)
    assert codec.input_shape == shape and codec.compression_ratio == 8.0
    return codec


@pytest.mark.parametrize(("name", "fixture", "shape"), SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_model_beats_or_equals_pca_on_held_out(
    name: str, fixture: str, shape: tuple[int, int]
) -> None:
    codec = load_shipped(name, shape)
    fallback = codec.extra_metadata["apcm.meta.fallback_to_init"] == "true"
    pca = pca_baseline(codec)
    x = load_file(str(FIXTURES / fixture))["test"].reshape(-1, *shape).float()
    ours, baseline = coded_mse(codec, x), coded_mse(pca, x)
    if fallback:
        assert ours == pytest.approx(baseline, rel=1e-4)
    else:
        assert ours < baseline


def test_text_model_out_of_domain_loss_is_bounded() -> None:
    codec = load_shipped("text-minilm-v1", (1, 384))
    x = load_file(str(FIXTURES / "text_heldout.safetensors"))["ood"].float()
    assert coded_mse(codec, x) < OOD_TOLERANCE * coded_mse(pca_baseline(codec), x)


def test_text_fixture_carries_the_texts_of_its_vectors() -> None:
    data = load_file(str(FIXTURES / "text_heldout.safetensors"))
    for key in ("test", "ood"):
        offsets = data[f"{key}_text_offsets"]
        assert offsets.shape[0] == data[key].shape[0] + 1
        blob = bytes(data[f"{key}_text_bytes"].numpy())
        texts = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        assert all(len(t) >= 40 for t in texts)
        assert len(set(texts)) == len(texts)


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def test_loading_refuses_an_altered_config_or_tensor(tmp_path: Path) -> None:
    src = ROOT / "model_weights" / "text-minilm-v1.safetensors"

    def bump_code_dim(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        config = json.loads(meta["apcm.config"])
        config["idrp"]["code_dim"] += 1
        meta["apcm.config"] = json.dumps(config)

    def flip_weight(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.predictor.out.bias"][0] += 1e-3

    for edit in (bump_code_dim, flip_weight):
        path = tmp_path / f"{edit.__name__}.safetensors"
        shutil.copy(src, path)
        _rewrite(path, edit)
        with pytest.raises(ModelFileError, match="content hash"):
            load_codec(path)


@pytest.mark.parametrize(("name", "budget", "split", "min_cos", "max_err"), V2_SHIPPED,
                         ids=[f"{r[0]}-{r[2]}" for r in V2_SHIPPED])
def test_v2_text_model_meets_its_measured_quality(
        name: str, budget: int, split: str, min_cos: float, max_err: float) -> None:
    codec = load_codec(ROOT / "model_weights" / f"{name}.safetensors")
    assert isinstance(codec, TransformCodec) and codec.code_dtype == "uint8"
    assert codec.bytes_per_code == budget and codec.compression_ratio == 1536 / budget
    assert json.loads(codec.extra_metadata["apcm.meta.embedder"])["dim"] == 384
    x = load_file(str(FIXTURES / V2_FIXTURE))[split].float().reshape(-1, 1, 384)
    x_hat = codec.decompress(codec.compress(x))
    cos = torch.nn.functional.cosine_similarity(x[:, 0], x_hat[:, 0]).mean()
    err = ((x - x_hat) ** 2).sum((1, 2)).mean()
    assert float(cos) >= min_cos and float(err) <= max_err


def test_v2_text_model_beats_pca_int8_at_equal_bytes() -> None:
    codec = load_codec(ROOT / "model_weights" / "text-minilm.safetensors")
    assert isinstance(codec, TransformCodec)
    x = load_file(str(FIXTURES / V2_FIXTURE))["test"].float().reshape(-1, 1, 384)
    # PCA-int8 at 192 B keeps 192 dims; its directions and scale are fitted on the
    # fixture itself, which favours the baseline (the model's stored rotation is not
    # a PCA basis: equal-width groups are turned). Fitted on these 300 items, PCA
    # captures them far better than out of sample; the model, which never saw them,
    # still has 3.4x less error (measured 1.61e-5 vs 5.50e-5 per value).
    flat = x.reshape(len(x), -1)
    mean, components, _ = fit_pca(flat.double())
    mean, components = mean.float(), components[:192].float()
    latents = (flat - mean) @ components.T
    pca = PCACodec("pca", (1, 384), mean, components,
                   CodeQuantizer("int8", CodeQuantizer.fit_int8_scale(latents)))
    assert coded_mse(codec, x) < 0.4 * coded_mse(pca, x)


# (file, fixture, item shape, bytes per code, highest held-out MSE per value): bounds a
# little looser than the held-out numbers of NAME.eval.md.
V2_IMAGES = [
    ("digits-v2", "digits_heldout.safetensors", (8, 8), 32, 0.04),
    ("gravel-grey", "gravel_grey_heldout.safetensors", (16, 16), 128, 2.5),
]


@pytest.mark.parametrize(("name", "fixture", "shape", "budget", "max_mse"), V2_IMAGES,
                         ids=[r[0] for r in V2_IMAGES])
def test_v2_image_models_beat_pca_at_equal_bytes(
        name: str, fixture: str, shape: tuple[int, int], budget: int, max_mse: float) -> None:
    codec = load_codec(ROOT / "model_weights" / f"{name}.safetensors")
    assert isinstance(codec, TransformCodec) and codec.bytes_per_code == budget
    assert codec.compression_ratio == 8.0 and not codec.model.config.renorm
    x = load_file(str(FIXTURES / fixture))["test"].float().reshape(-1, *shape)
    rotation = codec.model.rotation
    flat = x.reshape(len(x), -1)
    latents = (flat - rotation.mean) @ rotation.rotation[:budget].T
    pca = PCACodec("pca", shape, rotation.mean, rotation.rotation[:budget],
                   CodeQuantizer("int8", CodeQuantizer.fit_int8_scale(latents)))
    ours = coded_mse(codec, x)
    assert ours < 0.2 * coded_mse(pca, x) and ours <= max_mse


# (file, whether its score is the full-covariance one): the 4:1 file was fitted before
# it, and its diagonal score on a latent turned as a whole flags about half of the
# random vectors; regenerating it (scripts/train_v2_models.py) turns this test green
V2_TEXT_SCORES = [
    "text-minilm-32x", "text-minilm-16x", "text-minilm",
    pytest.param("text-minilm-4x", marks=pytest.mark.xfail(
        strict=True, reason="fitted with the diagonal score; needs regenerating")),
]


@pytest.mark.parametrize("name", V2_TEXT_SCORES)
def test_v2_text_model_flags_random_and_scaled_vectors_not_held_out_text(name: str) -> None:
    codec = load_codec(ROOT / "model_weights" / f"{name}.safetensors")
    fixture = load_file(str(FIXTURES / V2_FIXTURE))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1000, 384, generator=gen)
    noise = (noise / noise.norm(dim=1, keepdim=True)).reshape(-1, 1, 384)
    test = fixture["test"].float().reshape(-1, 1, 384)
    assert codec.check_items(test).flagged.mean() <= 0.03
    assert codec.check_items(test * 1.1).flagged.all()
    assert codec.check_items(test * 0.9).flagged.all()
    assert codec.check_items(noise).flagged.all()
