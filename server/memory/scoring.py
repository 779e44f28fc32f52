"""How a bank scores queries against its stored codes, when the codec decides.

Banks of ``float32``/``float16``/``int8`` codes score the dequantised codes directly
(``scale`` and ``metric``). A codec whose codes are not coordinates (packed bit
fields, e.g. the IDRP v2 transform code) hands the bank a ``CodeScorer`` instead,
through the domain layer: ``memory`` never imports a codec.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CodeScorer(Protocol):
    """Maps queries and stored codes into one space where cosine = the inputs' cosine.

    Attributes:
        query_dim: width of the latents a read receives (the codec's latent).
        search_dim: width of the vectors both map to.
    """

    query_dim: int
    search_dim: int

    def queries(self, latents: torch.Tensor) -> torch.Tensor:
        """Query latents [Q, query_dim] float32 -> [Q, search_dim] float32."""
        ...

    def codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes [c, m] (code dtype) -> [c, search_dim] float32."""
        ...

    def dots(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
        """``queries [Q, search_dim] @ codes(codes).T`` -> [Q, c] float32 computed
        without decoding (lookup tables), or None where this scorer cannot for these
        tensors (then reads decode with ``codes``)."""
        ...
