"""The transformer of an embedder's package in torch: token ids -> token states.

The reference the ONNX export is checked against, and the backend on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class TorchEncoder:
    """``transformers.AutoModel`` from the package's safetensors weights, eval mode.

    Args:
        directory: the model folder (``config.json``, ``model.safetensors``).
        device: "cpu" or "cuda[:n]".
    """

    # torch's CPU kernels pay per new shape: runs of 256 tokens took 3.6x as long as
    # runs of 4,096 on FAQ paragraphs
    run_tokens = 4096

    def __init__(self, directory: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar in a server log is noise
        self._torch = torch
        self.device = device
        self.model: Any = AutoModel.from_pretrained(str(directory), use_safetensors=True)
        self.model.eval().to(device)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids and mask [b, L] int64 -> last hidden states [b, L, d] float32."""
        torch = self._torch
        with torch.inference_mode():
            i = torch.from_numpy(ids).to(self.device)
            out = self.model(input_ids=i, attention_mask=torch.from_numpy(mask).to(self.device),
                             token_type_ids=torch.zeros_like(i))[0]
        return out.float().cpu().numpy()
