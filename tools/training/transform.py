"""Building, evaluating and (optionally) flow-training IDRP v2 text models.

The corpus is ``scripts/prepare_corpus.py``'s output: per-source MiniLM
embeddings plus texts. In-domain sources are split 70/10/20 per source (seed 0,
stratified), the out-of-domain sources (``fortunes``, ``licenses``) are never
trained on. ``fit_text_model`` is the untrained v2 model (the classical transform
coder); ``train_flow`` adds the paper's flow and aux predictor on top and keeps
them only if they beat the init on validation.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apcm.server.codecs.idrp import transform
from apcm.server.codecs.idrp.v2 import TransformCodec

OOD_SOURCES = ("fortunes", "licenses")


@dataclass
class TextSplits:
    """Vectors [N, 384] float32, their texts and their sources [N] str, per split name."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, np.ndarray] = field(default_factory=dict)


def load_corpus(folder: str | Path, seed: int = 0) -> TextSplits:
    """Splits ``train`` / ``val`` / ``test`` (in-domain) and one split per OOD source.

    Same procedure and seed as the prototype run the shipped models were fitted on,
    so the splits are the ones their model-card numbers were measured on.
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    emb = load_file(str(folder / "embeddings.safetensors"))
    texts = json.loads((folder / "sources.json").read_text())["texts"]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[np.ndarray, list[str], str]]] = {
        "train": [], "val": [], "test": []}
    for name in sorted(emb):
        if name in OOD_SOURCES:
            continue
        order = rng.permutation(len(emb[name]))
        x, t = emb[name][order], [texts[name][i] for i in order]
        a, b = int(0.7 * len(x)), int(0.8 * len(x))
        for split, lo, hi in (("train", 0, a), ("val", a, b), ("test", b, len(x))):
            parts[split].append((x[lo:hi], t[lo:hi], name))
    out = TextSplits()
    for split, chunks in parts.items():
        out.vectors[split] = np.concatenate([c[0] for c in chunks])
        out.texts[split] = [s for c in chunks for s in c[1]]
        out.sources[split] = np.concatenate([np.full(len(c[0]), c[2]) for c in chunks])
    for split in ("val", "test"):
        order = rng.permutation(len(out.vectors[split]))
        out.vectors[split] = out.vectors[split][order]
        out.texts[split] = [out.texts[split][i] for i in order]
        out.sources[split] = out.sources[split][order]
    for name in OOD_SOURCES:
        order = rng.permutation(len(emb[name]))
        out.vectors[name] = emb[name][order]
        out.texts[name] = [texts[name][i] for i in order]
        out.sources[name] = np.full(len(order), name)
    return out


def items(x: np.ndarray) -> torch.Tensor:
    """[N, 384] numpy -> [N, 1, 384] float32 items."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(len(x), 1, -1)


def fit_text_model(splits: TextSplits, budget: int, name: str,
                   **fit_kwargs: Any) -> TransformCodec:
    """The untrained v2 model at ``budget`` bytes; renormalisation chosen on validation.
    ``fit_kwargs``: robustness settings of :meth:`TransformCodec.fit` (``hedge``,
    ``rotate_groups``)."""
    return TransformCodec.fit(items(splits.vectors["train"]), budget,
                              val=items(splits.vectors["val"]), name=name, **fit_kwargs)


# ----------------------------------------------------------------- flow training
@dataclass(frozen=True)
class FlowTrainConfig:
    """Flow training settings (recorded in the weights file's metadata)."""

    n_blocks: int = 4
    hidden: int = 256
    aux_hidden: int = 256
    epochs: int = 5
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0


def _codec_mse(codec: TransformCodec, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(((codec.decompress(codec.compress(x)) - x) ** 2).sum((1, 2)).mean())


def train_flow(init: TransformCodec, train: torch.Tensor, val: torch.Tensor,
               cfg: FlowTrainConfig) -> tuple[TransformCodec, dict[str, Any]]:
    """Trains flow + aux predictor on ||x - x_hat||^2 through the real quantiser.

    Straight-through estimator applied *after* clamping to the quantiser's range
    (without the clamp the flow learns to push dims into the clipping range, which
    the estimator cannot see). After each epoch the centroid tables are refitted on
    the training latents (allocation and steps kept) and the validation error is
    measured through the real codec; the best state is kept, and the init is
    returned (``fallback_to_init``) if no epoch beats it.
    """
    torch.manual_seed(cfg.seed)
    base = init.model.config
    codec = TransformCodec.fit(train, base.budget, val=val, name=init.name,
                               renorm=base.renorm, n_blocks=cfg.n_blocks,
                               hidden=cfg.hidden, aux_hidden=cfg.aux_hidden, seed=cfg.seed)
    model = codec.model
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    x_train = train.reshape(len(train), -1)
    init_val = _codec_mse(init, val)
    history: list[dict[str, float]] = [{"epoch": 0, "val": init_val}]
    best, best_state, best_epoch = init_val, None, 0
    lo = (-(1 << model.bits) / 2 * model.step).detach()
    hi = ((1 << model.bits) / 2 * model.step).detach()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x_train)).split(cfg.batch_size):
            x = x_train[idx]
            y, _ = model(x)
            y_c = torch.maximum(torch.minimum(y, hi - 1e-6), lo)
            y_q = model.dequantize_cells(model.cells(y_c.detach()))
            y_hat = y_c + (y_q - y_c).detach()
            if model.predictor is not None:
                y_hat = y_hat.clone()
                y_hat[:, model.uncoded] = model.predictor(y_hat[:, model.coded])
            loss = ((model.output(model.inverse(y_hat)) - x) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            y_all = model(x_train)[0].numpy()
        fit = transform.QuantizerFit(model.bits.numpy(), model.step.numpy(),
                                     model.table.numpy(), model.offset.numpy())
        model.set_quantizer(transform.refit_table(y_all, fit))
        codec._hash = None
        val_mse = _codec_mse(codec, val)
        history.append({"epoch": epoch, "train": total / len(x_train), "val": val_mse})
        if val_mse < best:
            best, best_state, best_epoch = val_mse, copy.deepcopy(model.state_dict()), epoch
    record = {"init_val_mse": init_val, "best_val_mse": best, "best_epoch": best_epoch,
              "fallback_to_init": best_state is None, "history": history,
              "train_config": cfg.__dict__}
    if best_state is None:
        return init, record
    model.load_state_dict(best_state)
    model.refresh_layout()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    codec._hash = None
    codec.calibrate(val, train)  # the score's covariance is that of the trained flow's y
    return codec, record
