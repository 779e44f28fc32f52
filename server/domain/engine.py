"""Validated numpy <-> codec calls: the one place request arrays meet the model.

Arrays arrive as read-only numpy views of the request bytes; they go to torch
with ``torch.from_numpy`` (a copy only where the dtype must change or the
view is read-only and torch needs to own it) and come back with ``.numpy()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..codecs.base import Codec, ItemChecks
from ..errors import InvalidArgument
from .batching import MicroBatcher

FLOAT_INPUTS = (np.dtype("float32"), np.dtype("float16"), np.dtype("float64"))


# Request arrays are read-only views of the request bytes, and torch only reads them.
# Filtered once at import: warnings.catch_warnings() per request is not thread-safe
# and flips process-wide state under 64 handler threads.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


class Engine:
    """Runs the codec on validated batches.

    Args:
        codec: the served codec (already on its device).
        max_batch_size: largest B accepted.
    """

    def __init__(self, codec: Codec, max_batch_size: int) -> None:
        self.codec = codec
        self.max_batch_size = max_batch_size
        self.code_np_dtype = np.dtype(codec.code_dtype)
        self._compress: Callable[[np.ndarray], Any] = self._compress_now
        self._decompress: Callable[[np.ndarray], Any] = self._decompress_now
        self._encode: Callable[[np.ndarray], Any] = self._encode_now
        self._batchers: list[MicroBatcher] = []

    def enable_batching(
        self, max_batch: int, max_wait_s: float, observe: Callable[[str, int], None]
    ) -> None:
        """Route model calls through micro-batchers that merge concurrent requests."""
        def batcher(fn: Callable[[np.ndarray], Any], method: str) -> MicroBatcher:
            b = MicroBatcher(fn, max_batch=max_batch, max_wait_s=max_wait_s, name=method,
                             observe=lambda n: observe(method, n))
            self._batchers.append(b)
            return b

        self._compress = batcher(self._compress_now, "Compress")
        self._decompress = batcher(self._decompress_now, "Decompress")
        self._encode = batcher(self._encode_now, "Encode")

    def close(self) -> None:
        for b in self._batchers:
            b.close()

    # -- validation ----------------------------------------------------------------
    def _check_batch(self, array: np.ndarray, what: str, field: str) -> None:
        if array.ndim == 0 or array.shape[0] == 0:
            raise InvalidArgument(f"{what} batch is empty; send at least one item", field=field)
        if array.shape[0] > self.max_batch_size:
            raise InvalidArgument(
                f"{what} batch of {array.shape[0]} exceeds the maximum of {self.max_batch_size}",
                field=field,
            )

    def check_inputs(self, array: np.ndarray, field: str = "inputs") -> np.ndarray:
        """Validate items [B, L, D]; returns them as float32."""
        length, width = self.codec.input_shape
        if array.ndim != 3 or tuple(array.shape[1:]) != (length, width):
            raise InvalidArgument(
                f"{field} must have shape [B, {length}, {width}], got {list(array.shape)}",
                field=field,
            )
        self._check_batch(array, field, field)
        if array.dtype not in FLOAT_INPUTS:
            raise InvalidArgument(
                f"{field} must be float32 (float16/float64 accepted), got {array.dtype}",
                field=field,
            )
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise InvalidArgument(f"{field} contains NaN or Inf values", field=field)
        return array

    def check_codes(self, array: np.ndarray, field: str = "codes") -> np.ndarray:
        """Validate codes [B, m] in the codec's code dtype."""
        m = self.codec.code_dim
        if array.ndim != 2 or array.shape[1] != m:
            raise InvalidArgument(
                f"{field} must have shape [B, {m}], got {list(array.shape)}", field=field
            )
        self._check_batch(array, field, field)
        if array.dtype != self.code_np_dtype:
            raise InvalidArgument(
                f"{field} must have dtype {self.code_np_dtype} (the model's code dtype), "
                f"got {array.dtype}",
                field=field,
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidArgument(f"{field} contains NaN or Inf values", field=field)
        return array

    # -- model calls ---------------------------------------------------------------
    def compress(self, inputs: np.ndarray) -> np.ndarray:
        """Validated [B, L, D] float32 -> codes [B, m]."""
        return self._compress(inputs)

    def decompress(self, codes: np.ndarray) -> np.ndarray:
        """Validated codes [B, m] -> [B, L, D] float32."""
        return self._decompress(codes)

    def encode_latent(self, inputs: np.ndarray) -> torch.Tensor:
        """Validated [B, L, D] -> z_comp [B, m] float32 on the codec's device."""
        return self._encode(inputs)

    def _compress_now(self, inputs: np.ndarray) -> np.ndarray:
        return self.codec.compress(_as_tensor(inputs)).cpu().numpy()

    def _decompress_now(self, codes: np.ndarray) -> np.ndarray:
        return self.codec.decompress(_as_tensor(codes)).cpu().numpy()

    @torch.inference_mode()
    def _encode_now(self, inputs: np.ndarray) -> torch.Tensor:
        x = _as_tensor(inputs).to(self.codec.device).reshape(inputs.shape[0], -1)
        return self.codec.encode_latent(x)

    @torch.inference_mode()
    def codes_to_latent(self, codes: np.ndarray) -> torch.Tensor:
        return self.codec.codes_to_latent(_as_tensor(codes).to(self.codec.device))

    def check_items(self, inputs: np.ndarray,
                    codes: np.ndarray | torch.Tensor | None = None) -> ItemChecks | None:
        """Validated [B, L, D] -> the codec's per-item domain checks (None if it has none);
        ``codes`` are the items' codes when already computed."""
        if isinstance(codes, np.ndarray):
            codes = _as_tensor(codes)
        return self.codec.check_items(_as_tensor(inputs), codes)

    @torch.inference_mode()
    def latent_to_codes(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.quantizer.quantize(latents)

    @torch.inference_mode()
    def decode_soft(self, mix: torch.Tensor) -> np.ndarray:
        """A bank's softmax mix [Q, *] (its scoring space) -> [Q, L, D] float32 numpy."""
        scorer = self.codec.scorer
        if scorer is None:
            return self.decode_latent(mix)
        x = scorer.to_input(mix.to(self.codec.device, torch.float32))
        return x.reshape(mix.shape[0], *self.codec.input_shape).cpu().numpy()

    @torch.inference_mode()
    def decode_latent(self, latents: torch.Tensor) -> np.ndarray:
        """z_comp [B, m] float32 -> [B, L, D] float32 numpy."""
        x = self.codec.decode_latent(latents.to(self.codec.device, torch.float32))
        return x.reshape(latents.shape[0], *self.codec.input_shape).cpu().numpy()

    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """Stored codes [B, m] (torch, code dtype) -> [B, L, D] float32 numpy."""
        return self.codec.decompress(codes).cpu().numpy()
