"""The shipped weights: each loads, is 8:1 in bytes, and beats (or, with the fallback
recorded, equals) PCA with the same m and code dtype on its committed held-out fixture."""

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
from apcm.server.codecs.pca import PCACodec
from apcm.server.codecs.quant import CodeQuantizer
from apcm.server.errors import ModelFileError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHIPPED = [
    ("gravel-binary", "gravel_heldout.safetensors", (16, 16)),
    ("digits", "digits_heldout.safetensors", (8, 8)),
    ("text-minilm", "text_heldout.safetensors", (1, 384)),
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
    codec = load_shipped("text-minilm", (1, 384))
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
    src = ROOT / "model_weights" / "text-minilm.safetensors"

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
