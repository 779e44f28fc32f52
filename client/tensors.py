"""Kept for callers of ``apcm.client.tensors``: the code lives in ``apcm.wire.tensors``."""

from apcm.wire.tensors import *  # noqa: F403
from apcm.wire.tensors import DTYPE_CODES, DTYPE_NAMES, TensorFormatError, from_proto, to_proto

__all__ = ["DTYPE_CODES", "DTYPE_NAMES", "TensorFormatError", "from_proto", "to_proto"]
