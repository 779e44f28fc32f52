"""Retry policy: exponential backoff with full jitter, on UNAVAILABLE only.

UNAVAILABLE means the call did not reach a serving server (connection refused,
server restarting), so repeating it is the remedy; every other code is the
server's answer and is raised at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is repeated after UNAVAILABLE.

    Attributes:
        max_retries: attempts after the first (0 disables retries).
        initial_backoff_s: upper bound of the first pause.
        max_backoff_s: cap on any pause.
        multiplier: growth of the bound per attempt.
    """

    max_retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    @classmethod
    def coerce(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """Accept a policy or a bare retry count (default backoff)."""
        return retries if isinstance(retries, RetryPolicy) else cls(max_retries=int(retries))

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """Pauses before each retry, ``max_retries`` of them.

        Full jitter (uniform in [0, bound]) spreads reconnecting clients apart
        so a restarted server is not hit by all of them at once.
        """
        uniform = (rng or random).uniform
        bound = self.initial_backoff_s
        for _ in range(self.max_retries):
            yield uniform(0.0, bound)
            bound = min(bound * self.multiplier, self.max_backoff_s)


def is_retryable(code: grpc.StatusCode) -> bool:
    return code in RETRYABLE_CODES
