"""IDRPCodec through the codec file format: bit-identical save/load, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from apcm.server.codecs.base import content_hash, load_codec, save_codec
from apcm.server.codecs.idrp.codec import IDRPCodec
from apcm.server.codecs.idrp.model import IDRP, IDRPConfig
from apcm.server.codecs.quant import CodeQuantizer
from apcm.server.errors import ModelFileError


def make_codec(code_dtype: str = "float32") -> tuple[IDRPCodec, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, 8, generator=gen) @ torch.randn(8, 8, generator=gen)
    model = IDRP.from_data(x.reshape(300, -1), IDRPConfig(dim=16, code_dim=4, n_blocks=2,
                                                          hidden=16, aux_hidden=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    scale = None
    if code_dtype == "int8":
        scale = CodeQuantizer.fit_int8_scale(model.compress(x).detach())
    return IDRPCodec("toy", (2, 8), model, CodeQuantizer(code_dtype, scale)), x


@pytest.mark.parametrize("code_dtype", ["float32", "float16", "int8"])
def test_save_load_is_bit_identical(tmp_path: Path, code_dtype: str) -> None:
    codec, x = make_codec(code_dtype)
    path = tmp_path / "m.safetensors"
    digest = save_codec(codec, path, {"note": "test"})
    loaded = load_codec(path)
    assert isinstance(loaded, IDRPCodec) and loaded.content_hash == digest
    assert loaded.code_dtype == code_dtype and loaded.extra_metadata["apcm.meta.note"] == "test"
    codes = codec.compress(x)
    assert codes.dtype == loaded.compress(x).dtype
    assert torch.equal(codes, loaded.compress(x))
    assert torch.equal(codec.decompress(codes), loaded.decompress(codes))
    assert loaded.decompress(codes).shape == x.shape
    assert codec.compression_ratio == 64 / (4 * codec.quantizer.itemsize)


def test_refuses_a_file_whose_tensor_was_altered(tmp_path: Path) -> None:
    codec, _ = make_codec()
    path = tmp_path / "m.safetensors"
    save_codec(codec, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["model.predictor.out.bias"][0] += 1.0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="content hash"):
        load_codec(path)


def test_refuses_a_config_that_does_not_describe_the_tensors(tmp_path: Path) -> None:
    codec, _ = make_codec()
    path = tmp_path / "m.safetensors"
    save_codec(codec, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["apcm.config"])
    config["idrp"]["n_blocks"] = 3  # re-hashed, so only the structure check can catch it
    meta["apcm.config"] = json.dumps(config)
    meta["apcm.content_hash"] = content_hash("idrp", config, tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="does not match the stored tensors"):
        load_codec(path)


def test_int8_codes_reconstruct_close_to_float32() -> None:
    codec, x = make_codec("int8")
    codes = codec.compress(x)
    assert codes.dtype == torch.int8
    exact = codec.decode_latent(codec.encode_latent(x.reshape(300, -1))).reshape(x.shape)
    err = (codec.decompress(codes) - exact).abs().mean() / exact.abs().mean()
    assert 0 < err < 0.05
