"""How banks score queries against IDRP v2's packed codes (see
:mod:`apcm.server.codecs.idrp.v2`)."""

from __future__ import annotations

import torch

from .lutscan import LutScorer
from .transform import BitPacker, byte_aligned_order
from .v2model import TransformIDRP

WIRE = "wire"  # the codec's own bit layout (``memory.scoring.WIRE_LAYOUT``)
ALIGNED = "aligned-1"  # ``byte_aligned_order``: how banks store codes

SCORER_ROWS = 512  # codes decoded at a time for a Read (int32 intermediates stay in cache)


class TransformScorer:
    """Scores latent queries against packed codes by exact cosine of the decoded items.

    Implements ``apcm.server.memory.scoring.CodeScorer`` (structurally; ``memory``
    never imports codecs). Without a flow the search space is the rotated,
    uncentred latent ``y + R mean`` (an orthogonal image of the input space); with a
    flow it is the input space itself (queries and codes are decoded).

    ``layout`` is the bit layout of the codes it scores: the codec's (``WIRE``), or
    the byte-aligned one banks store (``ALIGNED``, from ``stored()``), where all but a
    few fields lie inside one byte and the lookup-table scan costs one table read per
    byte. Both hold the same cells; ``to_stored``/``from_stored`` convert.
    """

    def __init__(self, model: TransformIDRP, layout: str = WIRE) -> None:
        if layout not in (WIRE, ALIGNED):
            raise ValueError(f"unknown code layout {layout!r}")
        self.model = model
        self.layout = layout
        self.query_dim = model.config.dim
        self.search_dim = model.config.dim
        self._lut: tuple[tuple[int, ...], LutScorer] | None = None
        self._offset: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._aligned: tuple[tuple[int, ...], BitPacker] | None = None
        self._stored: TransformScorer | None = None

    def stored(self) -> TransformScorer:
        """The scorer of this model's codes in the layout banks store them in."""
        if self.layout == ALIGNED:
            return self
        if self._stored is None:
            self._stored = TransformScorer(self.model, ALIGNED)
        return self._stored

    @property
    def packer(self) -> BitPacker:
        """The packer of this scorer's layout (follows the model's bits and device)."""
        m = self.model
        if self.layout == WIRE:
            return m.packer
        key = (id(m.packer), m.bits._version)
        cached = self._aligned
        if cached is None or cached[0] != key:
            order = byte_aligned_order(m.bits)
            cached = self._aligned = (key, BitPacker(m.bits, order).to(m.bits.device))
        return cached[1]

    def to_stored(self, codes: torch.Tensor, layout: str = WIRE) -> torch.Tensor:
        """Codes [B, budget] in ``layout`` -> the same cells in this scorer's layout."""
        if layout == self.layout:
            return codes
        source = self.model.packer if layout == WIRE else self.stored().packer
        return self.packer.pack(source.unpack(codes))

    def from_stored(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, budget] in this scorer's layout -> the codec's (wire) layout."""
        if self.layout == WIRE:
            return codes
        return self.model.packer.pack(self.packer.unpack(codes))

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

    def dots(self, queries: torch.Tensor, codes: torch.Tensor,
             at: torch.Tensor | None = None) -> torch.Tensor | None:
        """Search vectors [Q, d] . decoded codes [c, budget] -> [Q, c] without decoding
        (per-dim lookup tables, ``lutscan``); with ``at`` [c] int64, of the rows
        ``codes[at]``, read in place. None where that does not apply (a flow or a
        predictor in the decode, or tensors off the CPU): then use ``codes``."""
        m = self.model
        if not self._exact_latent or m.predictor is not None or codes.device.type != "cpu" \
                or queries.device.type != "cpu":
            return None
        packer = self.packer
        key = (id(m.table), id(m.offset), id(packer), m.table._version)
        lut = self._lut
        if lut is None or lut[0] != key:
            lut = self._lut = (key, LutScorer(packer, m.table, m.offset,
                                              self._search_offset()))
        rows = at.numpy() if at is not None else None
        return torch.from_numpy(lut[1].scores(queries.detach().numpy(), codes.numpy(), rows))

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
        packer = self.packer
        if not self._exact_latent:
            return m.inverse(m.dequantize_cells(packer.unpack(codes)))
        offset = self._search_offset()
        if m.predictor is not None:
            return m.dequantize_cells(packer.unpack(codes)).add_(offset)
        out = torch.empty(codes.shape[0], m.config.dim, dtype=m.table.dtype, device=codes.device)
        table_offset = m.offset.to(torch.int32)
        for i in range(0, codes.shape[0], SCORER_ROWS):
            part = out[i:i + SCORER_ROWS]
            index = packer.unpack(codes[i:i + SCORER_ROWS]).add_(table_offset)
            torch.index_select(m.table, 0, index.view(-1), out=part.view(-1))
            part.add_(offset)  # ``queries``, while the rows are still in cache
        return out

    @torch.inference_mode()
    def to_input(self, v: torch.Tensor) -> torch.Tensor:
        """Search vectors [B, d] (e.g. a softmax mix) -> input space [B, d]."""
        if self._exact_latent:
            return v @ self.model.rotation.rotation
        return v
