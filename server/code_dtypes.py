"""The dtypes a stored code may have, by name: shared by the codecs that make codes
and the banks that keep them, so neither imports the other."""

from __future__ import annotations

import torch

CODE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8,
               "uint8": torch.uint8}
