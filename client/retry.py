"""Retry policy: exponential backoff with full jitter, on UNAVAILABLE only.

UNAVAILABLE means the call did not reach a serving server (connection refused,
server restarting), so repeating it is the remedy; every other code is the
server's answer and is raised at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from .errors import from_rpc_error, status_code

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


class Attempts:
    """The deadline and the pauses of one call's attempts.

    Both clients run their attempts through one of these, so they agree on what
    is retried and for how long; only the loop (blocking or awaiting) is theirs.

    Args:
        policy: the client's retry policy.
        budget: seconds for all attempts and pauses together (None: no deadline).
        retryable: False when a repeat could change the outcome: no pauses then.
    """

    def __init__(self, policy: RetryPolicy, budget: float | None, retryable: bool) -> None:
        self._deadline = None if budget is None else time.monotonic() + budget
        self._pauses = policy.backoffs() if retryable else iter(())

    def remaining(self) -> float | None:
        """The deadline of the next attempt (None: none)."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def pause_after(self, err: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises ``err`` as its ``ApcmError``
        when it is not retried, the retries are spent, or the pause would pass the deadline.
        """
        pause = next(self._pauses, None) if is_retryable(status_code(err)) else None
        if pause is None or (self._deadline is not None
                             and time.monotonic() + pause >= self._deadline):
            raise from_rpc_error(err) from err
        return pause
