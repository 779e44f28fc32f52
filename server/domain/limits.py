"""Request limits the domain checks before doing work: a read's reply size."""

from __future__ import annotations

import math

from ..errors import ResourceExhausted
from ..memory.bank import MemoryBank
from .params import ReadParams

# Serialized bytes of one Hit besides its key, payload and reconstruction: field tags,
# slot and sequence varints (up to 10 bytes each), score and weight, length prefixes.
HIT_OVERHEAD_BYTES = 40
# A Tensor message besides its data: shape, dtype and the length prefixes.
TENSOR_OVERHEAD_BYTES = 16


def check_reply_size(bank: MemoryBank, n_queries: int, p: ReadParams, *, input_bytes: int,
                 limit: int, include_reconstruction: bool, include_payloads: bool) -> None:
    """Refuses a read whose reply would not fit in one message, before doing it.

    The estimate is queries x min(top_k, occupied) x bytes per hit, where a hit
    costs its framing, the bank's mean key and (if asked for) mean payload and
    its L*D*4 reconstruction. Refusing early bounds the server's memory: a reply
    is built whole in memory (several copies) before gRPC can refuse to send it.
    """
    hits = min(p.top_k, bank.occupied_count)
    key_bytes, payload_bytes = bank.mean_entry_bytes()
    per_hit = HIT_OVERHEAD_BYTES + key_bytes
    parts = [f"{HIT_OVERHEAD_BYTES + round(key_bytes)} per hit"]
    if include_payloads:
        per_hit += payload_bytes
        parts.append(f"{round(payload_bytes)} per payload (include_payloads)")
    if include_reconstruction:
        per_hit += input_bytes + TENSOR_OVERHEAD_BYTES
        parts.append(f"{input_bytes} per reconstruction "
                     "(include_reconstruction)")
    per_query = hits * per_hit + 8
    if p.soft and hits:
        per_query += input_bytes + TENSOR_OVERHEAD_BYTES
        parts.append(f"{input_bytes} per soft read (soft)")
    estimate = math.ceil(n_queries * per_query)
    if estimate <= limit:
        return
    fixes = ["lower top_k", "send fewer queries per request"]
    fixes += [f"drop {flag}" for flag, on in (
        ("include_reconstruction", include_reconstruction),
        ("include_payloads", include_payloads), ("soft", p.soft)) if on]
    raise ResourceExhausted(
        f"this Read's reply would be about {estimate} bytes ({n_queries} queries x "
        f"{hits} hits (top_k {p.top_k}, {bank.occupied_count} occupied) x "
        f"{', '.join(parts)}), over the server's max_message_bytes of {limit}: "
        f"{', '.join(fixes)}", field="top_k", limit="max_message_bytes")
