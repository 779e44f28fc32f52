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

In-domain score: ``nll(x) = 0.5 * sum_i y_i^2 / var_i - log|det dF/dz|`` (the exact
negative log-likelihood, up to a constant, of a diagonal Gaussian on ``y``), turned
into a percentile of the validation NLLs; an item is flagged when the percentile
exceeds ``ood_percentile`` or, for unit-norm inputs, when its norm is off by more
than ``norm_tol``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ...errors import ModelFileError
from ..base import Codec, ItemChecks
from ..pca import fit_pca
from . import transform
from .flow import (
    AffineCoupling,
    Bijection,
    FixedScale,
    PCARotation,
    Permutation,
    SwiGLU,
)
from .lutscan import LutScorer

N_SCORE_QUANTILES = 1001
SCORER_ROWS = 512  # codes decoded at a time for a Read (int32 intermediates stay in cache)


@dataclass(frozen=True)
class TransformConfig:
    """Architecture of a v2 model.

    Attributes:
        dim: d. budget: bytes per code (``8 * budget`` bits allocated over d dims).
        n_blocks: flow couplings (0: no flow, exact latent search).
        hidden / n_res: coupling subnet size. aux_hidden: predictor width (0: none,
            the uncoded dims decode to 0). scale_clamp / shift_bound: coupling bounds.
        renorm: rescale decoded vectors to unit norm. norm_check: flag inputs whose
            norm is off by more than ``norm_tol`` (for unit-norm embedders).
        ood_percentile: flag items whose NLL percentile exceeds it. seed: permutations.
    """

    dim: int
    budget: int
    n_blocks: int = 0
    hidden: int = 256
    n_res: int = 1
    aux_hidden: int = 0
    scale_clamp: float = 1.0
    shift_bound: float = 10.0
    renorm: bool = False
    norm_check: bool = False
    norm_tol: float = 0.0
    ood_percentile: float = 0.99
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown v2 config keys {sorted(unknown)}")
        return cls(**d)


class TransformIDRP(nn.Module):
    """The v2 model: rotation, optional flow, quantiser tables, aux predictor, score stats.

    Buffers (all in the weights file): rotation ``mean`` [d] / ``rotation`` [d, d];
    ``sigma`` [d] latent std; ``bits`` [d] int64, ``step`` [d], ``table`` [T],
    ``offset`` [d] int64; ``score_quantiles`` [1001] validation NLL quantiles;
    ``norm_center`` [1] the inputs' typical norm.
    """

    bits: torch.Tensor
    step: torch.Tensor
    table: torch.Tensor
    offset: torch.Tensor
    sigma: torch.Tensor
    score_quantiles: torch.Tensor
    norm_center: torch.Tensor

    def __init__(self, config: TransformConfig, table_size: int | None = None) -> None:
        super().__init__()
        d = config.dim
        self.config = config
        self.rotation = PCARotation(torch.zeros(d), torch.eye(d))
        self.register_buffer("sigma", torch.ones(d))
        self.register_buffer("bits", torch.zeros(d, dtype=torch.int64))
        self.register_buffer("step", torch.zeros(d))
        self.register_buffer("table", torch.zeros(table_size if table_size is not None else d))
        self.register_buffer("offset", torch.arange(d, dtype=torch.int64))
        self.register_buffer("score_quantiles", torch.zeros(N_SCORE_QUANTILES))
        self.register_buffer("norm_center", torch.ones(1))
        self.packer = transform.BitPacker(self.bits)  # derived from ``bits``, not stored
        self.flow_layers = nn.ModuleList(self._flow_layers(config))
        self.predictor: SwiGLU | None = None

    @staticmethod
    def _flow_layers(config: TransformConfig) -> list[Bijection]:
        if config.n_blocks == 0:
            return []
        d = config.dim
        gen = torch.Generator().manual_seed(config.seed)
        layers: list[Bijection] = [FixedScale(torch.ones(d))]
        composed = torch.arange(d)
        for _ in range(config.n_blocks):
            layers.append(AffineCoupling(d, config.hidden, config.n_res, 0.0,
                                         config.scale_clamp, config.shift_bound))
            perm = torch.randperm(d, generator=gen)
            layers.append(Permutation(perm))
            composed = composed[perm]
        layers.append(Permutation(torch.argsort(composed)))  # back to PCA order
        layers.append(FixedScale(torch.ones(d)))  # times sigma (set to 1 / sigma)
        return layers

    def set_sigma(self, sigma: torch.Tensor) -> None:
        """Sets the latent std that the flow normalises by (and its own copy)."""
        self.sigma.copy_(sigma)
        if self.flow_layers:
            cast(FixedScale, self.flow_layers[0]).scale.copy_(sigma)
            cast(FixedScale, self.flow_layers[-1]).scale.copy_(1.0 / sigma)

    def set_quantizer(self, fit: transform.QuantizerFit) -> None:
        """Installs fitted bits/steps/tables and (re)builds the predictor's shape."""
        self.bits = torch.as_tensor(fit.bits, dtype=torch.int64).clone()
        self.step = torch.as_tensor(fit.step, dtype=torch.float32).clone()
        self.table = torch.as_tensor(fit.table, dtype=torch.float32).clone()
        self.offset = torch.as_tensor(fit.offset, dtype=torch.int64).clone()
        self.refresh_layout()
        n_coded = int((self.bits > 0).sum())
        wanted = self.config.aux_hidden > 0 and 0 < n_coded < self.config.dim
        if wanted and (self.predictor is None
                       or self.predictor.gate_value.in_features != n_coded):
            self.predictor = SwiGLU(n_coded, self.config.aux_hidden, self.config.dim - n_coded)
            nn.init.zeros_(self.predictor.out.weight)
            nn.init.zeros_(self.predictor.out.bias)

    def refresh_layout(self) -> None:
        """Rebuilds what derives from ``bits`` (call after changing them)."""
        self.packer = transform.BitPacker(self.bits).to(self.bits.device)
        self.coded = torch.nonzero(self.bits > 0).flatten()
        self.uncoded = torch.nonzero(self.bits == 0).flatten()

    # -- the bijection ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (y [B, d], log|det dy/dx| [B])."""
        y, log_det = self.rotation(x)
        for layer in self.flow_layers:
            y, ld = layer(y)
            log_det = log_det + ld
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d] -> x [B, d] (no renormalisation)."""
        for layer in reversed(self.flow_layers):
            y = cast(Bijection, layer).inverse(y)
        return self.rotation.inverse(y)

    def flow(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Alias of ``forward`` (the v1 model's name, used by the evaluation harness)."""
        return self.forward(x)

    def flow_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Alias of ``inverse``."""
        return self.inverse(y)

    # -- the code -----------------------------------------------------------------------
    def cells(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d] -> quantiser cells [B, d] int32 (0 for uncoded dims)."""
        levels = (1 << self.bits).to(y.dtype)
        safe = torch.where(self.bits > 0, self.step, torch.ones_like(self.step)).to(y.dtype)
        # divide (not multiply by 1 / step) and add: the code bytes are pinned to these
        # two roundings; an uncoded dim has one level, so the clamp sends it to cell 0
        q = torch.div(y, safe).add_(levels / 2).floor_()
        return q.clamp_(torch.zeros_like(levels), levels - 1).to(torch.int32)

    def lookup(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells [B, d] -> their table values [B, d] (uncoded dims 0, not predicted)."""
        index = cells.to(torch.int32, copy=True).add_(self.offset.to(torch.int32))
        return self.table.index_select(0, index.view(-1)).view(cells.shape)

    def dequantize_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells [B, d] -> y_hat [B, d] with uncoded dims predicted (0 without predictor)."""
        y = self.lookup(cells)
        if self.predictor is not None:
            y[:, self.uncoded] = self.predictor(y[:, self.coded])
        return y

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d] -> codes [B, budget] uint8."""
        return self.packer.pack(self.cells(y))

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, budget] uint8 -> y_hat [B, d]."""
        return self.dequantize_cells(self.packer.unpack(codes))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """What decoding returns for an un-normalised reconstruction ``x`` [B, d]."""
        if self.config.renorm:
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [B] (up to a constant) of items x [B, d]."""
        y, log_det = self.forward(x)
        return 0.5 * ((y / self.sigma) ** 2).sum(dim=1) - log_det


class PackedQuantizer:
    """Quantiser interface of the base codec over a :class:`TransformIDRP`'s tables.

    ``quantize`` packs latents y [B, d] into [B, budget] uint8; ``dequantize``
    returns the coded dims' table values (uncoded dims 0, not yet predicted).
    """

    code_dtype = "uint8"
    torch_dtype = torch.uint8
    itemsize = 1
    scale = None

    def __init__(self, model: TransformIDRP) -> None:
        self.model = model

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.pack(y)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.lookup(self.model.packer.unpack(codes))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def to(self, device: torch.device) -> PackedQuantizer:
        return self


class TransformScorer:
    """Scores latent queries against packed codes by exact cosine of the decoded items.

    Implements ``apcm.server.memory.scoring.CodeScorer`` (structurally; ``memory``
    never imports codecs). Without a flow the search space is the rotated,
    uncentred latent ``y + R mean`` (an orthogonal image of the input space); with a
    flow it is the input space itself (queries and codes are decoded).
    """

    def __init__(self, model: TransformIDRP) -> None:
        self.model = model
        self.query_dim = model.config.dim
        self.search_dim = model.config.dim
        self._lut: tuple[tuple[int, ...], LutScorer] | None = None
        self._offset: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _search_offset(self) -> torch.Tensor:
        """``R mean`` [d], what turns a latent into a search vector; cached, since a
        write's one-row decode (the index places every written slot) paid a 384x384
        product for it each time."""
        r = self.model.rotation
        key = (id(r.rotation), r.rotation._version, id(r.mean), r.mean._version)
        cached = self._offset
        if cached is None or cached[0] != key:
            cached = self._offset = (key, r.mean @ r.rotation.T)
        return cached[1]

    def dots(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
        """Search vectors [Q, d] . decoded codes [c, budget] -> [Q, c] without decoding
        (per-dim lookup tables, ``lutscan``); None where that does not apply (a flow or
        a predictor in the decode, or tensors off the CPU): then use ``codes``."""
        m = self.model
        if not self._exact_latent or m.predictor is not None or codes.device.type != "cpu" \
                or queries.device.type != "cpu":
            return None
        key = (id(m.table), id(m.offset), id(m.packer), m.table._version)
        lut = self._lut
        if lut is None or lut[0] != key:
            lut = self._lut = (key, LutScorer(m.packer, m.table, m.offset,
                                              self._search_offset()))
        return torch.from_numpy(lut[1].scores(queries.detach().numpy(), codes.numpy()))

    @property
    def _exact_latent(self) -> bool:
        return len(self.model.flow_layers) == 0

    @torch.inference_mode()
    def queries(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents y [Q, d] -> search vectors [Q, d]."""
        m = self.model
        if self._exact_latent:
            return latents + self._search_offset()
        return m.inverse(latents)

    @torch.inference_mode()
    def codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes [c, budget] -> search vectors [c, d] of their decoded items.

        Decoded ``SCORER_ROWS`` rows at a time into one output: a bank hands over
        thousands of codes per chunk, and the unpacking's int32 intermediates of a
        whole chunk (several MB) fall out of the CPU cache, which made a 4,096-row
        chunk cost 6-10x a 1,024-row one instead of 4x.
        """
        m = self.model
        if not self._exact_latent:
            return m.inverse(m.unpack(codes))
        offset = self._search_offset()
        if m.predictor is not None:
            return m.unpack(codes).add_(offset)
        out = torch.empty(codes.shape[0], m.config.dim, dtype=m.table.dtype, device=codes.device)
        table_offset = m.offset.to(torch.int32)
        for i in range(0, codes.shape[0], SCORER_ROWS):
            part = out[i:i + SCORER_ROWS]
            index = m.packer.unpack(codes[i:i + SCORER_ROWS]).add_(table_offset)
            torch.index_select(m.table, 0, index.view(-1), out=part.view(-1))
            part.add_(offset)  # ``queries``, while the rows are still in cache
        return out

    @torch.inference_mode()
    def to_input(self, v: torch.Tensor) -> torch.Tensor:
        """Search vectors [B, d] (e.g. a softmax mix) -> input space [B, d]."""
        if self._exact_latent:
            return v @ self.model.rotation.rotation
        return v


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
        super().__init__(name, input_shape, PackedQuantizer(self.model))  # type: ignore[arg-type]
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
                                 norm_tol=norm_tol, seed=seed)
        model = TransformIDRP(config, table_size=len(fit.table))
        model.rotation.mean.copy_(mean.float())
        model.rotation.rotation.copy_(components.float())
        model.set_sigma(torch.from_numpy(np.sqrt(np.maximum(z.var(0), 1e-24))).float())
        model.set_quantizer(fit)
        codec = cls(name, (length, width), model)
        held = val if val is not None else train
        if renorm is None and unit and val is not None:
            codec.set_renorm(codec._val_mse(val, True) < codec._val_mse(val, False))
        codec.calibrate(held)
        return codec

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
    def calibrate(self, held: torch.Tensor) -> None:
        """Score percentiles from held-out items [N, L, D] (validation)."""
        x = held.reshape(held.shape[0], -1).float().to(self.device)
        nll = self.model.nll(x).double().cpu()
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
