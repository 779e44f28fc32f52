"""numpy <-> apcm.v1.Tensor: shape + dtype + raw little-endian bytes.

Decoding makes one copy (protobuf's ``bytes`` accessor) and then views it with
``np.frombuffer`` (read-only); encoding copies once, into the message.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from apcm.v1 import tensor_pb2

_TO_NUMPY: dict[Any, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT8: np.dtype("i1"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
}
_FROM_NUMPY = {
    dt.newbyteorder("<") if dt.itemsize > 1 else dt: code for code, dt in _TO_NUMPY.items()
}
DTYPE_NAMES = {
    tensor_pb2.DTYPE_FLOAT32: "float32",
    tensor_pb2.DTYPE_FLOAT16: "float16",
    tensor_pb2.DTYPE_INT8: "int8",
    tensor_pb2.DTYPE_FLOAT64: "float64",
    tensor_pb2.DTYPE_UINT8: "uint8",
}
DTYPE_CODES = {name: code for code, name in DTYPE_NAMES.items()}


class TensorFormatError(ValueError):
    """A Tensor message whose dtype, shape or byte length is inconsistent."""


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode a numpy array (float32/float16/float64/int8/uint8) as a Tensor message."""
    arr = np.asarray(array)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    code = _FROM_NUMPY.get(dtype)
    if code is None:
        raise TensorFormatError(
            f"unsupported dtype {arr.dtype}; use one of float32, float16, float64, int8, uint8"
        )
    data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    return tensor_pb2.Tensor(shape=list(arr.shape), dtype=code, data=data)


def from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor message into a read-only numpy view of its bytes.

    Raises:
        TensorFormatError: unknown dtype, negative dims, or a byte length that
            does not match shape x itemsize.
    """
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorFormatError(
            f"tensor dtype {tensor.dtype} is not one of "
            f"{', '.join(f'{name} ({c})' for c, name in DTYPE_NAMES.items())}"
            + (" (0 is DTYPE_UNSPECIFIED: set the dtype)" if tensor.dtype == 0 else "")
        )
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorFormatError(f"tensor shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: np.prod wraps around in int64
    expected = count * dtype.itemsize
    data = tensor.data  # each attribute access copies the bytes out of the message
    if len(data) != expected:
        raise TensorFormatError(
            f"tensor of shape {list(shape)} and dtype {DTYPE_NAMES[tensor.dtype]} needs "
            f"{expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    except ValueError as e:  # an empty tensor whose dims numpy cannot represent
        raise TensorFormatError(f"tensor shape {list(shape)} is too large: {e}") from e
