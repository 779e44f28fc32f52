"""The IDRP module: invertible flow ``f`` plus the predictor ``g`` of the discarded part.

``z = f(flatten(x))`` [B, d] is split into ``z_comp`` [B, m] (kept) and ``z_aux``
[B, d - m] (discarded); ``decompress(z_comp) = f^-1([z_comp, g(z_comp)])``.

``f`` = PCA rotation (float64 fit, stored float32) -> optional per-dim scaling
-> N x (affine coupling, fixed random permutation) -> one fixed permutation
that undoes the composed permutations. Couplings and ``g``'s output layer start
at zero, so the untrained model is exactly PCA-m: ``z_comp`` is the top-m
principal coefficients and ``g`` predicts 0 (the mean) for the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
from torch import nn

from ..pca import fit_pca
from .flow import (
    AffineCoupling,
    Bijection,
    FixedScale,
    PCARotation,
    Permutation,
    SwiGLU,
)


@dataclass(frozen=True)
class IDRPConfig:
    """Architecture of an IDRP model (everything needed to rebuild its modules).

    Attributes:
        dim: d = L * D. code_dim: m. n_blocks: couplings. hidden / n_res: subnet
        width and residual blocks. aux_hidden: predictor width. dropout: in the
        subnets and predictor (training only). scale_clamp / shift_bound: soft
        bounds on s and t. whiten: divide PCA coefficients by their std.
        seed: seed of the fixed permutations.
    """

    dim: int
    code_dim: int
    n_blocks: int = 4
    hidden: int = 128
    n_res: int = 1
    aux_hidden: int = 256
    dropout: float = 0.0
    scale_clamp: float = 1.0
    shift_bound: float = 10.0
    whiten: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IDRPConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown IDRP config keys {sorted(unknown)}")
        return cls(**d)


class IDRP(nn.Module):
    """Invertible dimensionality reduction with predictor.

    Args:
        config: architecture. The PCA buffers start as identity / zero mean;
            use :meth:`from_data` (or load a state dict) to set them.
    """

    def __init__(self, config: IDRPConfig) -> None:
        super().__init__()
        d, m = config.dim, config.code_dim
        if not 1 <= m < d:
            raise ValueError(f"code_dim must be in [1, {d - 1}], got {m}")
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        layers: list[Bijection] = [PCARotation(torch.zeros(d), torch.eye(d))]
        if config.whiten:
            layers.append(FixedScale(torch.ones(d)))
        composed = torch.arange(d)
        for _ in range(config.n_blocks):
            layers.append(
                AffineCoupling(
                    d, config.hidden, config.n_res, config.dropout,
                    config.scale_clamp, config.shift_bound,
                )
            )
            perm = torch.randperm(d, generator=gen)
            layers.append(Permutation(perm))
            composed = composed[perm]
        # Undo the composed shuffles so latent order = PCA order (init == PCA-m).
        layers.append(Permutation(torch.argsort(composed)))
        self.layers = nn.ModuleList(layers)
        self.predictor = SwiGLU(m, config.aux_hidden, d - m, config.dropout)
        nn.init.zeros_(self.predictor.out.weight)
        nn.init.zeros_(self.predictor.out.bias)

    @classmethod
    def from_data(cls, x: torch.Tensor, config: IDRPConfig, min_std_ratio: float = 1e-3) -> IDRP:
        """Build with the PCA of training items ``x`` [N, d] (float64 fit).

        ``min_std_ratio`` floors the whitening scale relative to the largest std,
        so near-constant directions (e.g. always-blank pixels) are not blown up.
        """
        model = cls(config)
        mean, components, variances = fit_pca(x.reshape(x.shape[0], -1))
        rotation = cast(PCARotation, model.layers[0])
        rotation.mean.copy_(mean.float())
        rotation.rotation.copy_(components.float())
        if config.whiten:
            std = variances.sqrt()
            scale = cast(FixedScale, model.layers[1])
            scale.scale.copy_(std.clamp_min(float(std.max()) * min_std_ratio).float())
        return model

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    def whitening_scales(self) -> torch.Tensor | None:
        """The fixed scales [m] that z_comp's dimensions were divided by, or None.

        The last layer restores PCA order, so z_comp's dimension j is (a coupled
        version of) the j-th principal coordinate over its standard deviation.
        """
        if not self.config.whiten:
            return None
        scale = cast(FixedScale, self.layers[1])
        return scale.scale[: self.code_dim].detach()

    def flow(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f: [B, d] -> (z [B, d], log|det df/dx| [B])."""
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def flow_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """f^-1: [B, d] -> [B, d]."""
        for layer in reversed(self.layers):
            z = cast(Bijection, layer).inverse(z)
        return z

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, ...] (flattened to d) -> (z_comp [B, m], z_aux [B, d-m], logdet [B])."""
        z, log_det = self.flow(x.reshape(x.shape[0], -1))
        m = self.config.code_dim
        return z[:, :m], z[:, m:], log_det

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ...] -> z_comp [B, m]."""
        return self.forward(x)[0]

    def predict_aux(self, z_comp: torch.Tensor) -> torch.Tensor:
        """g: z_comp [B, m] -> predicted z_aux [B, d - m]."""
        return self.predictor(z_comp)

    def decompress(self, z_comp: torch.Tensor) -> torch.Tensor:
        """z_comp [B, m] -> x_hat [B, d] = f^-1([z_comp, g(z_comp)])."""
        return self.flow_inverse(torch.cat([z_comp, self.predict_aux(z_comp)], dim=1))

    inverse = decompress
