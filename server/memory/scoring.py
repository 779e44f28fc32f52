"""How a bank scores queries against its stored codes, when the codec decides.

Banks of ``float32``/``float16``/``int8`` codes score the dequantised codes directly
(``scale`` and ``metric``). A codec whose codes are not coordinates (packed bit
fields, e.g. the IDRP v2 transform code) hands the bank a ``CodeScorer`` instead,
through the domain layer: ``memory`` never imports a codec.
"""

from __future__ import annotations

from typing import Protocol

import torch

WIRE_LAYOUT = "wire"  # codes as the codec makes them (clients, logs, older snapshots)


class CodeScorer(Protocol):
    """Maps queries and stored codes into one space where cosine = the inputs' cosine.

    A scorer may score codes in a bank-side bit layout of its own (``layout``), into
    which a bank converts what it stores and back out of which it hands codes to
    clients; ``WIRE_LAYOUT`` means the codec's own.

    Attributes:
        query_dim: width of the latents a read receives (the codec's latent).
        search_dim: width of the vectors both map to.
        layout: the bit layout of the codes ``codes`` and ``dots`` take.
    """

    query_dim: int
    search_dim: int
    layout: str

    def queries(self, latents: torch.Tensor) -> torch.Tensor:
        """Query latents [Q, query_dim] float32 -> [Q, search_dim] float32."""
        ...

    def codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes [c, m] (code dtype) -> [c, search_dim] float32."""
        ...

    def dots(self, queries: torch.Tensor, codes: torch.Tensor,
             at: torch.Tensor | None = None) -> torch.Tensor | None:
        """``queries [Q, search_dim] @ codes(codes).T`` -> [Q, c] float32 computed
        without decoding (lookup tables); with ``at`` [c] int64, of the rows
        ``codes[at]``, read in place. None where this scorer cannot for these tensors
        (then reads decode with ``codes``)."""
        ...

    def to_stored(self, codes: torch.Tensor, layout: str = WIRE_LAYOUT) -> torch.Tensor:
        """Codes [B, m] in ``layout`` -> the same codes in ``self.layout``."""
        ...

    def from_stored(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, m] in ``self.layout`` -> the codec's own layout."""
        ...
