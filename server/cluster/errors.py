"""The cluster's domain errors: refusals a live shard makes, mapped to statuses like
any other ``ApcmError`` (``server.errors``)."""

from __future__ import annotations

from ..errors import ApcmError, Unavailable

# Set on every refusal a shard itself makes: an UNAVAILABLE without it came from
# the transport (the shard is down), one with it from a live shard (e.g. "moving").
SHARD_HEADER = "apcm-shard"


class ShardUnavailable(Unavailable):
    """UNAVAILABLE from a live shard (``shard``: its id, sent in ``SHARD_HEADER``)."""

    def __init__(self, message: str, *, shard: int) -> None:
        super().__init__(message)
        self.shard = shard

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((SHARD_HEADER, str(self.shard)),)


class PeerError(ApcmError):
    """Another shard's refusal, passed on as it came: its status code (``code``, a
    ``grpc.StatusCode`` name), message and trailers (a rich-error detail included)."""

    def __init__(self, code: str, message: str,
                 trailers: tuple[tuple[str, str | bytes], ...]) -> None:
        super().__init__(message)
        self.code = code
        self._trailers = trailers

    @property
    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


class ShardMoved(ShardUnavailable):
    """Refused before anything changed: another pod owns (or now holds) the shard.
    The message always says "moved", which the router and the SDK take as safe to send
    again."""
