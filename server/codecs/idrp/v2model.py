"""The IDRP v2 model and its code tables (see :mod:`apcm.server.codecs.idrp.v2`).

:class:`TransformIDRP` holds the rotation, optional flow, quantiser tables, aux
predictor and score statistics; :class:`PackedQuantizer` is the base codec's
quantiser interface over its tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
from torch import nn

from . import transform
from .flow import (
    AffineCoupling,
    Bijection,
    FixedScale,
    PCARotation,
    Permutation,
    SwiGLU,
)

N_SCORE_QUANTILES = 1001


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
        score_full_cov: the score's Gaussian on y has the full training covariance
            (buffer ``score_whiten``), not only its diagonal ``sigma``.
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
    score_full_cov: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.score_full_cov:  # files fitted before it keep their config and hash
            del d["score_full_cov"]
        return d

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
    ``norm_center`` [1] the inputs' typical norm; with ``score_full_cov``,
    ``score_whiten`` [d, d], which maps y to coordinates of unit training variance
    (``set_score_covariance``).
    """

    bits: torch.Tensor
    step: torch.Tensor
    table: torch.Tensor
    offset: torch.Tensor
    sigma: torch.Tensor
    score_quantiles: torch.Tensor
    norm_center: torch.Tensor
    score_whiten: torch.Tensor  # only with ``config.score_full_cov``

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
        if config.score_full_cov:
            self.register_buffer("score_whiten", torch.diag(1.0 / self.sigma))
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
    def _quantizer_steps(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[d] divisor and offset of ``cells`` (an uncoded dim: 1 and 0.5, one level)."""
        levels = (1 << self.bits).to(dtype)
        safe = torch.where(self.bits > 0, self.step, torch.ones_like(self.step)).to(dtype)
        return safe, levels / 2

    def cells(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d] -> quantiser cells [B, d] int32 (0 for uncoded dims)."""
        safe, half = self._quantizer_steps(y.dtype)
        # divide (not multiply by 1 / step) and add: the code bytes are pinned to these
        # two roundings; an uncoded dim has one level, so the clamp sends it to cell 0
        q = torch.div(y, safe).add_(half).floor_()
        return q.clamp_(torch.zeros_like(half), 2 * half - 1).to(torch.int32)

    def lookup(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells [B, d] -> their table values [B, d] (uncoded dims 0, not predicted)."""
        index = cells.to(torch.int32, copy=True).add_(self.offset.to(torch.int32))
        return self.table.index_select(0, index.view(-1)).view(cells.shape)

    def lookup_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, budget] uint8 -> ``lookup(packer.unpack(codes))`` [B, d]."""
        if codes.device.type == "cpu" and self.table.dtype == torch.float32:
            return self.packer.unpack_lookup(codes, self.table, self.offset)
        return self.lookup(self.packer.unpack(codes))

    def predict_uncoded(self, y: torch.Tensor) -> torch.Tensor:
        """Table values y [B, d] -> y_hat [B, d], uncoded dims predicted (in place)."""
        if self.predictor is not None:
            y[:, self.uncoded] = self.predictor(y[:, self.coded])
        return y

    def dequantize_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells [B, d] -> y_hat [B, d] with uncoded dims predicted (0 without predictor)."""
        return self.predict_uncoded(self.lookup(cells))

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d] -> codes [B, budget] uint8."""
        if y.device.type == "cpu" and y.dtype == torch.float32:
            return self.packer.quantize_pack(y, *self._quantizer_steps(y.dtype))
        return self.packer.pack(self.cells(y))

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, budget] uint8 -> y_hat [B, d]."""
        return self.predict_uncoded(self.lookup_codes(codes))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """What decoding returns for an un-normalised reconstruction ``x`` [B, d]."""
        if self.config.renorm:
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x

    def set_score_covariance(self, cov: torch.Tensor) -> None:
        """Sets ``score_whiten`` [d, d] from the training covariance [d, d] of y.

        Eigenvalues are floored at float32's resolution of vectors with the
        training spread (``eps**2 * trace``): in a direction with less variance the
        training data carry only rounding noise, and scoring that noise would make
        an in-domain item's NLL a matter of its rounding.
        """
        cov = cov.double()
        evals, evecs = torch.linalg.eigh(cov)
        floor = torch.finfo(torch.float32).eps ** 2 * float(torch.trace(cov))
        whiten = evecs.T / evals.clamp_min(floor).sqrt()[:, None]
        self.score_whiten.copy_(whiten.float())

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [B] (up to a constant) of items x [B, d]."""
        y, log_det = self.forward(x)
        if self.config.score_full_cov:
            return 0.5 * ((y @ self.score_whiten.T) ** 2).sum(dim=1) - log_det
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
        return self.model.lookup_codes(codes)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def to(self, device: torch.device) -> PackedQuantizer:
        return self
