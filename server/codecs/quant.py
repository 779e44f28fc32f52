"""Code quantisation: how a latent ``z_comp`` [B, m] float32 is stored in bytes.

float32 is the paper's code; float16 halves the bytes; int8 quarters them with a
per-dimension scale fitted on training codes (symmetric, round-to-nearest).
"""

from __future__ import annotations

from typing import Protocol

import torch

# uint8 codes are bit-packed by IDRP v2's own quantiser, not by this one
from ..code_dtypes import CODE_DTYPES

INT8_LIMIT = 127.0


class Quantizer(Protocol):
    """What a codec stores its latents through: a :class:`CodeQuantizer`, or IDRP v2's
    ``PackedQuantizer`` (bit-packed ``uint8`` codes), which shares no base with it."""

    @property
    def code_dtype(self) -> str: ...

    @property
    def itemsize(self) -> int: ...

    @property
    def scale(self) -> torch.Tensor | None: ...

    def quantize(self, z: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def to(self, device: torch.device) -> Quantizer: ...


class CodeQuantizer:
    """Maps latents to stored codes and back.

    Args:
        code_dtype: "float32", "float16" or "int8".
        scale: per-dimension step [m] for int8 (ignored otherwise).
    """

    def __init__(self, code_dtype: str, scale: torch.Tensor | None = None) -> None:
        if code_dtype not in CODE_DTYPES or code_dtype == "uint8":
            raise ValueError("code dtype must be one of float32, float16, int8, got "
                             f"{code_dtype!r} (uint8 codes are packed by IDRP v2's quantiser)")
        if code_dtype == "int8" and scale is None:
            raise ValueError("int8 codes need a per-dimension scale")
        self.code_dtype = code_dtype
        self.torch_dtype = CODE_DTYPES[code_dtype]
        self.scale = scale.float() if scale is not None and code_dtype == "int8" else None

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    @staticmethod
    def fit_int8_scale(latents: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
        """Per-dimension scale so that the ``quantile`` of |z| maps to 127.

        Args:
            latents: training latents [N, m].
        """
        bound = torch.quantile(latents.abs().double(), quantile, dim=0).float()
        return torch.clamp(bound, min=1e-8) / INT8_LIMIT

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """[B, m] float32 -> [B, m] codes."""
        if self.scale is None:
            return z.to(self.torch_dtype)
        q = torch.round(z / self.scale.to(z.device))
        return q.clamp_(-INT8_LIMIT, INT8_LIMIT).to(torch.int8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, m] codes -> [B, m] float32 latents."""
        z = codes.float()
        if self.scale is not None:
            z = z * self.scale.to(z.device)
        return z

    def fake_quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise-then-dequantise with a straight-through gradient (for QAT)."""
        return z + (self.dequantize(self.quantize(z.detach())) - z).detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.scale is None else {"quant.scale": self.scale}

    def to(self, device: torch.device) -> CodeQuantizer:
        if self.scale is not None:
            self.scale = self.scale.to(device)
        return self
