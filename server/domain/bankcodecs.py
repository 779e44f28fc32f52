"""Codecs fitted to one bank's memories (``memory.bankcodec`` says when and how a
bank swaps to one; this module says what is fitted).

A bank's codec is the served model's own structure fitted in domain: PCA over the
bank's staged items, exact integer bit allocation at the served budget (reverse
water-filling on the measured distortions) and uniform quantisers with fitted steps
and cell tables (``TransformCodec.fit``), with no variance hedge: that makes the
shipped model robust to text it never saw, and a bank's codec is fitted on the text
it serves. It is fitted twice, with and without a random rotation within each group
of equal-width dims, and the bank keeps the one that codes its held-out items better:
on conversation turns the rotation lowered held-out MSE at 4:1 (by 13 %) to 16:1 and
raised it at 32:1. No flow: on 2 cores a flow costs minutes of training
per bank, and the classical coder fitted in domain already beats every byte-matched
baseline fitted there (see docs/BENCHMARKS.md). Codes keep the served model's size,
so a bank's slots, limits and wire format are unchanged.

Only served IDRP v2 models (packed transform codes) give banks codecs of their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..codecs.base import Codec
from ..codecs.idrp.v2 import TransformCodec
from ..errors import FailedPrecondition, ModelFileError
from ..memory.codecstage import FittedCodec
from ..memory.scoring import CodeScorer
from .engine import Engine

# Items a fit uses to choose steps and bits (tables use every staged item).
FIT_SAMPLE = 8000
# The ways a bank's codec is fitted (``TransformCodec.fit`` settings by name).
VARIANTS: dict[str, dict[str, Any]] = {
    "pca": {},
    "pca+group-rotation": {"rotate_groups": True},
}


class BankCodec:
    """One bank's fitted codec (``memory.bankcodec.FittedCodec``), with the engine the
    service encodes and decodes that bank's items with."""

    def __init__(self, codec: TransformCodec, max_batch_size: int) -> None:
        self.codec = codec
        self.scorer: CodeScorer = codec.scorer.stored()
        self.model_hash = codec.content_hash
        self.engine = Engine(codec, max_batch_size)

    def encode(self, items: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
        return self.codec.compress(x.reshape(x.shape[0], *self.codec.input_shape)).cpu()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        out = self.codec.decompress(codes.to(self.codec.device))
        return out.reshape(out.shape[0], -1).cpu().numpy()

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        tensors = {k: v.detach().cpu().contiguous().numpy()
                   for k, v in self.codec.model_tensors().items()}
        return {"name": self.codec.name, **self.codec.full_config()}, tensors


class BankCodecFitter:
    """Fits and loads bank codecs for a served v2 model (``memory.bankcodec.CodecFitter``).

    Args:
        served: the served codec. threshold: staged items at which a bank fits.
        max_batch_size: the engine's request limit.
    """

    def __init__(self, served: TransformCodec, threshold: int, max_batch_size: int) -> None:
        self.served = served
        self.threshold = int(threshold)
        self.input_dim = served.input_dim
        self.variants = tuple(VARIANTS)
        self.max_batch_size = max_batch_size

    @classmethod
    def for_codec(cls, codec: Codec, threshold: int, max_batch_size: int
                  ) -> BankCodecFitter | None:
        """A fitter if ``codec`` is one banks can fit their own of, else None."""
        if threshold <= 0 or not isinstance(codec, TransformCodec):
            return None
        return cls(codec, threshold, max_batch_size)

    def fit(self, items: np.ndarray, variant: str) -> BankCodec:
        served = self.served
        x = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
        codec = TransformCodec.fit(
            x.reshape(x.shape[0], *served.input_shape), served.code_dim,
            name=f"{served.name}.bank", renorm=served.model.config.renorm, n_fit=FIT_SAMPLE,
            **VARIANTS[variant])
        codec.extra_metadata = dict(served.extra_metadata)
        codec.to(served.device)
        return BankCodec(codec, self.max_batch_size)

    def load(self, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> BankCodec:
        try:
            tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
            codec = TransformCodec.from_file_parts(str(config.get("name", "bank")), config,
                                                   tensors, None)
        except (KeyError, TypeError, ValueError, ModelFileError) as e:
            raise FailedPrecondition(f"a bank's own codec does not load: {e}") from e
        if codec.code_dim != self.served.code_dim or codec.input_shape != \
                self.served.input_shape:
            raise FailedPrecondition(
                f"a bank's own codec makes {codec.code_dim}-byte codes of "
                f"{codec.input_shape} items; the served model {self.served.code_dim}-byte "
                f"codes of {self.served.input_shape}")
        codec.extra_metadata = dict(self.served.extra_metadata)
        codec.to(self.served.device)
        return BankCodec(codec, self.max_batch_size)

    def base_items(self, codes: torch.Tensor) -> np.ndarray:
        out = self.served.decompress(codes.to(self.served.device))
        return out.reshape(out.shape[0], -1).cpu().numpy()

    def round_trip(self, codec: FittedCodec | None, items: np.ndarray) -> np.ndarray:
        if codec is not None:
            return codec.decode(codec.encode(items))
        x = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
        return self.base_items(self.served.compress(x.reshape(x.shape[0],
                                                              *self.served.input_shape)))
