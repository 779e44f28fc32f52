"""PCA codec: the paper's baseline, served through the same API as the IDRP.

z = (x - mean) @ W.T with W the top-m principal directions [m, d] (orthonormal
rows), x_hat = z @ W + mean. Fitted in float64.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Codec
from .quant import CodeQuantizer


def fit_pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal directions of ``x`` [N, d], computed in float64.

    Returns:
        mean [d], components [d, d] (rows = directions, by decreasing variance),
        explained variances [d]. Signs are fixed so each direction's largest
        |entry| is positive, making the result deterministic.
    """
    x64 = x.double()
    mean = x64.mean(0)
    cov = (x64 - mean).T @ (x64 - mean) / max(1, x64.shape[0] - 1)
    variances, vectors = torch.linalg.eigh(cov)
    order = torch.argsort(variances, descending=True)
    components = vectors[:, order].T.contiguous()
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    components = components * signs[:, None]
    return mean, components, variances[order].clamp_min(0)


class PCACodec(Codec):
    """Linear codec: top-m principal components of the training data.

    Args:
        mean: [d] float32. components: [m, d] float32 with orthonormal rows.
    """

    kind = "pca"

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, int],
        mean: torch.Tensor,
        components: torch.Tensor,
        quantizer: CodeQuantizer,
    ) -> None:
        super().__init__(name, input_shape, quantizer)
        self.mean = mean.float().contiguous()
        self.components = components.float().contiguous()

    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        code_dim: int,
        code_dtype: str = "float32",
        name: str = "pca",
    ) -> PCACodec:
        """Fit on training items ``x`` [N, L, D]."""
        n, length, width = x.shape
        flat = x.reshape(n, -1)
        if not 1 <= code_dim <= flat.shape[1]:
            raise ValueError(f"code_dim must be in [1, {flat.shape[1]}], got {code_dim}")
        mean, components, _ = fit_pca(flat)
        scale = None
        if code_dtype == "int8":
            latents = ((flat.double() - mean) @ components[:code_dim].T).float()
            scale = CodeQuantizer.fit_int8_scale(latents)
        quantizer = CodeQuantizer(code_dtype, scale)
        return cls(name, (length, width), mean, components[:code_dim], quantizer)

    @property
    def code_dim(self) -> int:
        return int(self.components.shape[0])

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components + self.mean

    def config(self) -> dict[str, Any]:
        return {}

    def model_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}

    @classmethod
    def from_file_parts(
        cls,
        name: str,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        quantizer: CodeQuantizer,
    ) -> PCACodec:
        return cls(
            name, tuple(config["input_shape"]), tensors["mean"], tensors["components"], quantizer
        )

    def _move(self, device: torch.device) -> None:
        self.mean = self.mean.to(device)
        self.components = self.components.to(device)
