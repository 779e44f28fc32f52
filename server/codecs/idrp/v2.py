"""IDRP v2: the paper's structure (invertible map, coded part, predicted part) with a
byte-exact transform code. Kind ``idrp``, config ``"version": 2``.

``x`` [B, d] -> ``z = (x - mean) @ R.T`` (orthogonal PCA over all d dims, not whitened)
-> optional flow ``F`` (affine couplings on ``z / sigma``, identity at init)
-> ``y`` [B, d] -> per-dim uniform quantisers with ``b_i`` bits, ``sum b_i = 8 * budget``
(:mod:`apcm.server.codecs.idrp.transform`) -> ``budget`` packed bytes (code dtype
``uint8``, ``code_dim = budget``). Dims with ``b_i = 0`` are ``z_aux``: the aux
predictor ``g`` restores them from the dequantised coded dims (0 at init).
Decode: ``x_hat = F^-1(y_hat) @ R + mean``, optionally rescaled to unit norm.

The untrained model (no flow, zero predictor) *is* the classical transform coder.
Without a flow, cosine search in the rotated latent is exact: with ``c = R mean``,
``x = (y + c) @ R``, so ``cos(q, x_hat) = cos(y_q + c, y_hat + c)`` (``R`` orthogonal).

In-domain score: ``nll(x) = 0.5 * y^T C^-1 y - log|det dF/dz|`` (the exact negative
log-likelihood, up to a constant, of a Gaussian on ``y`` with the training
covariance ``C``), turned into a percentile of the validation NLLs; an item is
flagged when the percentile exceeds ``ood_percentile`` or, for unit-norm inputs,
when its norm is off by more than ``norm_tol``. ``C`` is full, not its diagonal: a
group rotation mixes principal directions of very different variance into each
coded dim, and at 4:1 (every dim 8 bits, one group) it turns the whole space, so a
diagonal Gaussian on ``y`` is nearly isotropic and scores a random unit vector
like a text embedding. Files fitted before ``score_full_cov`` keep the diagonal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import ModelFileError
from ..base import Codec, ItemChecks
from ..pca import fit_pca
from . import transform
from .v2model import N_SCORE_QUANTILES, PackedQuantizer, TransformConfig, TransformIDRP
from .v2scorer import TransformScorer


class TransformCodec(Codec):
    """Codec of kind ``idrp``, version 2: see the module docstring.

    Args:
        name: model name. input_shape: (L, D), L * D = model.config.dim.
        model: the fitted :class:`TransformIDRP`.
    """

    kind = "idrp"

    def __init__(self, name: str, input_shape: tuple[int, int], model: TransformIDRP) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().__init__(name, input_shape, PackedQuantizer(self.model))
        if self.input_dim != model.config.dim:
            raise ValueError(f"input shape {input_shape} does not match dim {model.config.dim}")
        self._scorer = TransformScorer(self.model)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        train: torch.Tensor,
        budget_bytes: int,
        *,
        val: torch.Tensor | None = None,
        name: str = "idrp-v2",
        renorm: bool | None = None,
        n_blocks: int = 0,
        hidden: int = 256,
        aux_hidden: int = 0,
        n_fit: int = 8000,
        seed: int = 0,
        hedge: float = 0.0,
        rotate_groups: bool = False,
        hedge_steps: bool = True,
    ) -> TransformCodec:
        """The untrained model on items ``train`` [N, L, D]: exactly the classical
        transform coder (PCA, exact integer bit allocation, uniform quantisers).

        Args:
            budget_bytes: bytes per code, 1 .. d.
            val: validation items [V, L, D] for the score percentiles and, when
                ``renorm`` is None, for choosing renormalisation (only considered for
                unit-norm training data).
            n_blocks, hidden, aux_hidden: flow and predictor sizes (identity / zero at
                init).
            hedge, rotate_groups, hedge_steps: robustness of the fit to another source's variance
                spectrum (:func:`apcm.server.codecs.idrp.transform.fit_quantizer`);
                a group rotation is folded into the stored rotation (still orthogonal).
        """
        n, length, width = train.shape
        d = length * width
        if not 1 <= budget_bytes <= d:
            raise ValueError(f"budget must be 1..{d} bytes, got {budget_bytes}")
        flat = train.reshape(n, d).double()
        mean, components, _ = fit_pca(flat)
        z = ((flat - mean) @ components.T).numpy()
        fit = transform.fit_quantizer(z, budget_bytes, n_fit=n_fit, seed=seed, hedge=hedge,
                                      rotate_groups=rotate_groups, hedge_steps=hedge_steps)
        if fit.rotation is not None:
            group = torch.from_numpy(fit.rotation)
            components, z = group @ components.double(), z @ fit.rotation.T
        norms = flat.norm(dim=1)
        unit = bool((norms - 1).abs().max() < 1e-3)
        norm_tol = max(10 * float((norms - 1).abs().max()), 1e-4) if unit else 0.0
        config = TransformConfig(dim=d, budget=budget_bytes, n_blocks=n_blocks, hidden=hidden,
                                 aux_hidden=aux_hidden, renorm=bool(renorm), norm_check=unit,
                                 norm_tol=norm_tol, seed=seed, score_full_cov=True)
        model = TransformIDRP(config, table_size=len(fit.table))
        model.rotation.mean.copy_(mean.float())
        model.rotation.rotation.copy_(components.float())
        model.set_sigma(torch.from_numpy(np.sqrt(np.maximum(z.var(0), 1e-24))).float())
        model.set_quantizer(fit)
        codec = cls(name, (length, width), model)
        held = val if val is not None else train
        if renorm is None and unit and val is not None:
            codec.set_renorm(codec._val_mse(val, True) < codec._val_mse(val, False))
        codec.calibrate(held, train)
        return codec

    def rescore(self, train: torch.Tensor, val: torch.Tensor) -> None:
        """Switches the in-domain score to the full-covariance Gaussian, its covariance
        from ``train`` [N, L, D] (the fit's items) and its percentiles from ``val``;
        the code (rotation, bits, steps, tables) is untouched, so are its bytes."""
        m = self.model
        if not m.config.score_full_cov:
            m.config = TransformConfig.from_dict({**m.config.to_dict(), "score_full_cov": True})
            m.register_buffer("score_whiten", torch.eye(m.config.dim, device=self.device))
        self.calibrate(val, train)

    def set_renorm(self, on: bool) -> None:
        self.model.config = TransformConfig.from_dict({**self.model.config.to_dict(),
                                                       "renorm": bool(on)})
        self._hash = None

    def _val_mse(self, val: torch.Tensor, renorm: bool) -> float:
        old = self.model.config.renorm
        self.set_renorm(renorm)
        try:
            x = val.reshape(val.shape[0], *self.input_shape).float()
            return float(((self.decompress(self.compress(x)) - x) ** 2).sum((1, 2)).mean())
        finally:
            self.set_renorm(old)

    @torch.inference_mode()
    def calibrate(self, held: torch.Tensor, train: torch.Tensor | None = None) -> None:
        """Score percentiles from held-out items [N, L, D] (validation); with
        ``train`` [N', L, D] (the fit's items), first the score's covariance (models
        with ``score_full_cov``), from the latents of the current flow."""
        m = self.model
        if train is not None and m.config.score_full_cov:
            y = m(train.reshape(train.shape[0], -1).float().to(self.device))[0].double()
            m.set_score_covariance(torch.cov(y.T).cpu())
        x = held.reshape(held.shape[0], -1).float().to(self.device)
        nll = m.nll(x).double().cpu()
        qs = torch.quantile(nll, torch.linspace(0, 1, N_SCORE_QUANTILES, dtype=torch.float64))
        self.model.score_quantiles.copy_(qs.float())
        self._hash = None

    # -- the codec API --------------------------------------------------------------------
    @property
    def code_dim(self) -> int:
        return self.model.config.budget

    @property
    def latent_dim(self) -> int:
        return self.model.config.dim

    @property
    def scorer(self) -> TransformScorer:
        return self._scorer

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d] -> y [B, d] (every dim; the code keeps the allocated bits of each)."""
        return self.model(x)[0]

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.unpack(codes.to(self.device))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.output(self.model.inverse(z))

    @torch.inference_mode()
    def check_items(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> ItemChecks:
        """In-domain score, flags and exact reconstruction error of items [B, L, D];
        ``codes`` [B, budget] are their codes when the caller already encoded them
        (Compress and per-item Write do), so the items are not encoded twice."""
        flat = x.to(self.device, torch.float32).reshape(x.shape[0], -1)
        m = self.model
        nll = m.nll(flat)
        qs = m.score_quantiles
        idx = torch.searchsorted(qs, nll.contiguous()).clamp(1, len(qs) - 1)
        lo, hi = qs[idx - 1], qs[idx]
        frac = ((nll - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        pct = ((idx - 1).float() + frac) / (len(qs) - 1)
        pct = torch.where(nll <= qs[0], torch.zeros_like(pct),
                          torch.where(nll >= qs[-1], torch.ones_like(pct), pct))
        norm_off = torch.zeros_like(pct, dtype=torch.bool)
        if m.config.norm_check:
            norm_off = (flat.norm(dim=1) - m.norm_center).abs() > m.config.norm_tol
        if codes is None:
            codes = self.compress(x)
        recon = self.decode_latent(self.codes_to_latent(codes.to(self.device)))
        err = ((recon - flat) ** 2).sum(dim=1)
        flagged = (pct > m.config.ood_percentile) | norm_off
        return ItemChecks(pct.cpu().numpy(), flagged.cpu().numpy(), norm_off.cpu().numpy(),
                          err.cpu().numpy())

    def config(self) -> dict[str, Any]:
        return {"version": 2, "idrp": self.model.config.to_dict()}

    def model_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    @classmethod
    def from_file_parts(cls, name: str, config: dict[str, Any],
                        tensors: dict[str, torch.Tensor], quantizer: Any) -> TransformCodec:
        try:
            cfg = TransformConfig.from_dict(config["idrp"])
            model = TransformIDRP(cfg, table_size=int(tensors["table"].shape[0]))
            bits = tensors["bits"]
            if int(bits.sum()) != 8 * cfg.budget:
                raise ValueError(f"bits sum to {int(bits.sum())}, not 8 x {cfg.budget}")
            n_coded = int((bits > 0).sum())
            fit = transform.QuantizerFit(bits.numpy(), tensors["step"].numpy(),
                                         tensors["table"].numpy(), tensors["offset"].numpy())
            model.set_quantizer(fit)
            if cfg.aux_hidden > 0 and 0 < n_coded < cfg.dim and model.predictor is None:
                raise ValueError("predictor expected")
            model.load_state_dict(tensors, strict=True)
            model.refresh_layout()
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"IDRP v2 config does not match the stored tensors: {e}") from e
        return cls(name, tuple(config["input_shape"]), model)

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        self.model.refresh_layout()
        self.model.coded = self.model.coded.to(device)
        self.model.uncoded = self.model.uncoded.to(device)
