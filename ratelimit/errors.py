"""Exceptions raised by the ``ratelimit`` package.

The tree::

    RateLimitError
    ├── LimitConfigError       a ``Limit`` was built with an invalid field (names the field)
    ├── InvalidCost            an acquisition asked for a cost below 1
    │   └── CostTooLarge       the cost exceeds a key's burst, so it could never be granted
    └── BackendUnavailable     the shared store (Redis/Valkey) failed; wraps the library error

Being refused is not an error: ``try_acquire`` returns the seconds to wait and ``acquire`` waits.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "CostTooLarge",
    "InvalidCost",
    "LimitConfigError",
    "RateLimitError",
]


class RateLimitError(Exception):
    """Root of every error raised by ``ratelimit``."""


class LimitConfigError(RateLimitError):
    """A ``Limit`` field is invalid; the message names the field and the accepted values."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"Limit.{field}: {problem}")


class InvalidCost(RateLimitError):
    """An acquisition asked for a cost that cannot be granted."""

    def __init__(self, cost: int, problem: str = "cost must be an integer >= 1") -> None:
        self.cost = cost
        super().__init__(f"cost {cost}: {problem}")


class CostTooLarge(InvalidCost):
    """The cost exceeds the burst of ``key``: no amount of waiting would grant it."""

    def __init__(self, cost: int, *, key: str, burst: int) -> None:
        self.key = key
        self.burst = burst
        super().__init__(cost, f"exceeds the burst {burst} of limit key {key!r}; raise the burst or split")


class BackendUnavailable(RateLimitError):
    """The shared store failed (connection, timeout, script error); the cause is chained."""
