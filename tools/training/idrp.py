"""Training loop of the IDRP: joint reconstruction MSE in x-space, chosen on validation.

The model starts as exact PCA-m (see :mod:`apcm.server.codecs.idrp.model`); the
validation MSE of that init, measured through the real code dtype, is the bar.
Every epoch is validated the same way and the best state kept; if no epoch
beats the init, the init (= PCA) is what gets shipped, and the result says so.
For int8 codes an optional quantisation-aware fine-tuning phase trains through
``CodeQuantizer.fake_quantize`` (straight-through) from the best float state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from apcm.server.codecs.idrp.model import IDRP, IDRPConfig
from apcm.server.codecs.quant import CodeQuantizer


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (all recorded in the weights file's metadata)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.0
    grad_clip: float = 1.0
    patience: int = 15
    qat_epochs: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What training produced: the chosen model and its quantiser, and the record."""

    model: IDRP
    quantizer: CodeQuantizer
    history: list[dict[str, float]] = field(default_factory=list)
    init_val_mse: float = math.nan
    best_val_mse: float = math.nan
    best_epoch: int = 0
    fallback_to_init: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "init_val_mse": self.init_val_mse,
            "best_val_mse": self.best_val_mse,
            "best_epoch": self.best_epoch,
            "fallback_to_init": self.fallback_to_init,
            "epochs_run": len(self.history),
        }


def code_dim_for_ratio(dim: int, ratio: float, code_dtype: str) -> int:
    """m such that m codes of ``code_dtype`` are 1/ratio of d float32 values in bytes."""
    itemsize = CodeQuantizer(code_dtype, torch.ones(1)).itemsize
    m = dim * 4 / (ratio * itemsize)
    if m != int(m) or not 1 <= m < dim:
        raise ValueError(f"ratio {ratio} with {code_dtype} codes gives m={m} for d={dim}; "
                         "need an integer in [1, d)")
    return int(m)


@torch.no_grad()
def fit_quantizer(model: IDRP, x_train: torch.Tensor, code_dtype: str) -> CodeQuantizer:
    """The code quantiser for ``model``: int8 scales fitted on its training latents."""
    if code_dtype != "int8":
        return CodeQuantizer(code_dtype)
    was_training = model.training
    model.eval()
    z = torch.cat([model.compress(b) for b in x_train.split(4096)])
    model.train(was_training)
    return CodeQuantizer("int8", CodeQuantizer.fit_int8_scale(z))


@torch.no_grad()
def coded_mse(model: IDRP, quantizer: CodeQuantizer, x: torch.Tensor) -> float:
    """MSE of x [N, d] against its reconstruction through the stored codes."""
    model.eval()
    total = 0.0
    for b in x.split(4096):
        z = quantizer.dequantize(quantizer.quantize(model.compress(b)))
        total += float(F.mse_loss(model.decompress(z), b, reduction="sum"))
    return total / x.numel()


def train_idrp(
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    model_config: IDRPConfig,
    code_dtype: str,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an IDRP on ``x_train`` [N, d], choosing the best state on ``x_val`` [M, d].

    Args:
        on_epoch: called after every epoch with {epoch, phase, train_loss, val_mse}.
    """
    torch.manual_seed(config.seed)
    device = torch.device(device)
    x_train = x_train.float().to(device)
    x_val = x_val.float().to(device)
    model = IDRP.from_data(x_train.double().cpu(), model_config).to(device)
    noise_scale = config.noise_std * x_train.std(dim=0, keepdim=True)

    quantizer = fit_quantizer(model, x_train, code_dtype)
    result = TrainResult(model=model, quantizer=quantizer)
    result.init_val_mse = result.best_val_mse = coded_mse(model, quantizer, x_val)
    best_state = copy.deepcopy(model.state_dict())

    def run_phase(phase: str, epochs: int, lr: float, qat: bool) -> None:
        nonlocal best_state, quantizer
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
        since_best = 0
        gen = torch.Generator(device="cpu").manual_seed(config.seed + len(result.history))
        for _ in range(epochs):
            model.train()
            order = torch.randperm(x_train.shape[0], generator=gen).to(device)
            total, count = 0.0, 0
            for idx in order.split(config.batch_size):
                x = x_train[idx]
                x_in = x + noise_scale * torch.randn_like(x) if config.noise_std > 0 else x
                z_comp = model.compress(x_in)
                if qat:
                    z_comp = quantizer.fake_quantize(z_comp)
                loss = F.mse_loss(model.decompress(z_comp), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                total += loss.item() * x.shape[0]
                count += x.shape[0]
            schedule.step()
            quantizer = fit_quantizer(model, x_train, code_dtype)
            val = coded_mse(model, quantizer, x_val)
            record = {"epoch": float(len(result.history) + 1), "phase": float(qat),
                      "train_loss": total / count, "val_mse": val}
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if val < result.best_val_mse:
                result.best_val_mse, result.best_epoch = val, len(result.history)
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
            else:
                since_best += 1
                if since_best >= config.patience:
                    break

    run_phase("float", config.epochs, config.lr, qat=False)
    if code_dtype == "int8" and config.qat_epochs > 0:
        model.load_state_dict(best_state)
        quantizer = fit_quantizer(model, x_train, code_dtype)
        run_phase("qat", config.qat_epochs, config.lr * 0.3, qat=True)

    model.load_state_dict(best_state)
    model.eval()
    result.fallback_to_init = result.best_epoch == 0
    result.quantizer = fit_quantizer(model, x_train, code_dtype)
    return result
