"""Trailing-metadata keys the server sets and the SDK reads (plain ASCII, so grpcurl
and clients in other languages see them too)."""

from __future__ import annotations

# On RESOURCE_EXHAUSTED from a server limit: the setting that refused the request
# (``memory_limit_bytes``, ``max_banks``, ``max_message_bytes``). Its absence means the
# server or gRPC refused the call for load or size, which the SDK tells apart.
LIMIT_KEY = "apcm-limit"
