"""How banks score queries against IDRP v2's packed codes (see
:mod:`apcm.server.codecs.idrp.v2`)."""

from __future__ import annotations

import torch

from .lutscan import LutScorer
from .v2model import TransformIDRP

SCORER_ROWS = 512  # codes decoded at a time for a Read (int32 intermediates stay in cache)


class TransformScorer:
    """Scores latent queries against packed codes by exact cosine of the decoded items.

    Implements ``apcm.server.memory.scoring.CodeScorer`` (structurally; ``memory``
    never imports codecs). Without a flow the search space is the rotated,
    uncentred latent ``y + R mean`` (an orthogonal image of the input space); with a
    flow it is the input space itself (queries and codes are decoded).
    """

    def __init__(self, model: TransformIDRP) -> None:
        self.model = model
        self.query_dim = model.config.dim
        self.search_dim = model.config.dim
        self._lut: tuple[tuple[int, ...], LutScorer] | None = None
        self._offset: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _search_offset(self) -> torch.Tensor:
        """``R mean`` [d], what turns a latent into a search vector; cached, since a
        write's one-row decode (the index places every written slot) paid a 384x384
        product for it each time."""
        r = self.model.rotation
        key = (id(r.rotation), r.rotation._version, id(r.mean), r.mean._version)
        cached = self._offset
        if cached is None or cached[0] != key:
            cached = self._offset = (key, r.mean @ r.rotation.T)
        return cached[1]

    def dots(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
        """Search vectors [Q, d] . decoded codes [c, budget] -> [Q, c] without decoding
        (per-dim lookup tables, ``lutscan``); None where that does not apply (a flow or
        a predictor in the decode, or tensors off the CPU): then use ``codes``."""
        m = self.model
        if not self._exact_latent or m.predictor is not None or codes.device.type != "cpu" \
                or queries.device.type != "cpu":
            return None
        key = (id(m.table), id(m.offset), id(m.packer), m.table._version)
        lut = self._lut
        if lut is None or lut[0] != key:
            lut = self._lut = (key, LutScorer(m.packer, m.table, m.offset,
                                              self._search_offset()))
        return torch.from_numpy(lut[1].scores(queries.detach().numpy(), codes.numpy()))

    @property
    def _exact_latent(self) -> bool:
        return len(self.model.flow_layers) == 0

    @torch.inference_mode()
    def queries(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents y [Q, d] -> search vectors [Q, d]."""
        m = self.model
        if self._exact_latent:
            return latents + self._search_offset()
        return m.inverse(latents)

    @torch.inference_mode()
    def codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes [c, budget] -> search vectors [c, d] of their decoded items.

        Decoded ``SCORER_ROWS`` rows at a time into one output: a bank hands over
        thousands of codes per chunk, and the unpacking's int32 intermediates of a
        whole chunk (several MB) fall out of the CPU cache, which made a 4,096-row
        chunk cost 6-10x a 1,024-row one instead of 4x.
        """
        m = self.model
        if not self._exact_latent:
            return m.inverse(m.unpack(codes))
        offset = self._search_offset()
        if m.predictor is not None:
            return m.unpack(codes).add_(offset)
        out = torch.empty(codes.shape[0], m.config.dim, dtype=m.table.dtype, device=codes.device)
        table_offset = m.offset.to(torch.int32)
        for i in range(0, codes.shape[0], SCORER_ROWS):
            part = out[i:i + SCORER_ROWS]
            index = m.packer.unpack(codes[i:i + SCORER_ROWS]).add_(table_offset)
            torch.index_select(m.table, 0, index.view(-1), out=part.view(-1))
            part.add_(offset)  # ``queries``, while the rows are still in cache
        return out

    @torch.inference_mode()
    def to_input(self, v: torch.Tensor) -> torch.Tensor:
        """Search vectors [B, d] (e.g. a softmax mix) -> input space [B, d]."""
        if self._exact_latent:
            return v @ self.model.rotation.rotation
        return v
