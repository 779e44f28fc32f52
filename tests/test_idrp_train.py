"""Training keeps the best validation state, never ships worse than the PCA init,
and the ``apcm train`` / ``apcm eval`` commands produce loadable, honest outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apcm.server.cli import main
from apcm.server.codecs.base import load_codec
from apcm.server.codecs.idrp.model import IDRP, IDRPConfig
from apcm.tools.training.idrp import (
    TrainConfig,
    code_dim_for_ratio,
    coded_mse,
    fit_quantizer,
    train_idrp,
)


def curve_data(n: int, seed: int) -> torch.Tensor:
    """Points near a 2-d curved manifold in 16-d: PCA-2 cannot capture it, a flow can."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, 2, generator=gen) * 4 - 2
    feats = torch.cat([t, t**2, torch.sin(2 * t), t[:, :1] * t[:, 1:]], dim=1)
    mix = torch.randn(7, 16, generator=torch.Generator().manual_seed(99))
    return feats @ mix + 0.01 * torch.randn(n, 16, generator=gen)


def test_training_beats_the_pca_init_on_validation() -> None:
    torch.set_num_threads(1)
    x_train, x_val = curve_data(1024, 0), curve_data(256, 1)
    cfg = IDRPConfig(dim=16, code_dim=2, n_blocks=2, hidden=32, aux_hidden=64)
    result = train_idrp(x_train, x_val, cfg, "float32",
                        TrainConfig(epochs=8, batch_size=128, lr=3e-3, seed=0))
    pca = IDRP.from_data(x_train.double(), cfg).eval()
    pca_mse = coded_mse(pca, fit_quantizer(pca, x_train, "float32"), x_val)
    assert result.init_val_mse == pytest.approx(pca_mse, rel=1e-6)
    assert not result.fallback_to_init and result.best_epoch >= 1
    assert result.best_val_mse < 0.9 * pca_mse
    # the returned model is the best state, not the last one
    assert coded_mse(result.model, result.quantizer, x_val) == pytest.approx(result.best_val_mse,
                                                                             rel=1e-5)
    assert result.best_val_mse == min(h["val_mse"] for h in result.history)


def test_no_improvement_ships_the_init_and_says_so() -> None:
    x_train, x_val = curve_data(256, 2), curve_data(64, 3)
    cfg = IDRPConfig(dim=16, code_dim=4, n_blocks=1, hidden=16, aux_hidden=16)
    result = train_idrp(x_train, x_val, cfg, "int8",
                        TrainConfig(epochs=2, lr=0.0, weight_decay=0.0, qat_epochs=1))
    assert result.fallback_to_init and result.best_epoch == 0
    pca = IDRP.from_data(x_train.double(), cfg).eval()
    assert torch.equal(result.model.compress(x_val), pca.compress(x_val))


def test_code_dim_is_set_by_bytes() -> None:
    assert code_dim_for_ratio(384, 8, "float32") == 48
    assert code_dim_for_ratio(384, 8, "float16") == 96
    assert code_dim_for_ratio(384, 8, "int8") == 192
    with pytest.raises(ValueError, match="integer"):
        code_dim_for_ratio(10, 8, "float32")


def test_train_and_eval_commands_end_to_end(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "items.npy"
    np.save(data, curve_data(600, 4).numpy().reshape(600, 2, 8), allow_pickle=False)
    out = tmp_path / "toy.safetensors"
    rc = main(["train", "--data", str(data), "--shape", "2,8", "--ratio", "8",
               "--code-dtype", "int8", "--out", str(out), "--epochs", "3", "--qat-epochs", "1",
               "--blocks", "2", "--hidden", "16", "--aux-hidden", "16", "--device", "cpu"])
    assert rc == 0
    codec = load_codec(out)
    assert (codec.code_dim, codec.code_dtype, codec.compression_ratio) == (8, "int8", 8.0)
    meta = codec.extra_metadata
    metrics = json.loads(meta["apcm.meta.metrics"])
    assert metrics["val_mse_idrp"] <= metrics["val_mse_pca_same_m"] * (1 + 1e-6)
    assert meta["apcm.meta.fallback_to_init"] in ("true", "false")
    assert len(json.loads(meta["apcm.meta.pca_int8_scale"])) == 8
    assert (tmp_path / "toy.loss.png").stat().st_size > 1000
    capsys.readouterr()
    report = tmp_path / "report.md"
    rc = main(["eval", "--model", str(out), "--data", str(data), "--splits", "data",
               "--train-key", "data", "--no-faiss", "--embeddings", "--out", str(report)])
    assert rc == 0
    text = report.read_text()
    assert "| IDRP int8 m=8 (this model) | 8 | 8:1 |" in text
    assert "| PCA int8 m=8 (same m) | 8 | 8:1 |" in text
    assert "PCA float32 m=2" in text and "recall@10" in text
