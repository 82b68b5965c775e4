"""Exceptions raised by the ``monitoring`` package.

The tree::

    MonitoringError
    ├── LabelValueError          a label value is outside its fixed set, badly formed, or looks
    │                            like recipient data (a phone number, an email address)
    └── MultiprocessSetupError   multiprocess mode is half set up (the environment variable is
                                 set but ``setup_multiprocess`` was not called, or the directory
                                 cannot be used)

Both are programming or deployment errors: they are raised at the first call that would record
a bad series, never swallowed, so a bad label never reaches Prometheus.
"""

from __future__ import annotations

__all__ = ["LabelValueError", "MonitoringError", "MultiprocessSetupError"]


class MonitoringError(Exception):
    """Root of every error raised by ``monitoring``."""


class LabelValueError(MonitoringError, ValueError):
    """A label value is not allowed (unknown enum value, bad shape, or address-like)."""

    def __init__(self, label: str, problem: str) -> None:
        # The offending value is deliberately not echoed: it may be recipient data.
        super().__init__(f"label {label!r}: {problem}")
        self.label = label
        self.problem = problem


class MultiprocessSetupError(MonitoringError):
    """Multiprocess metrics are misconfigured; the message says what to call and when."""
