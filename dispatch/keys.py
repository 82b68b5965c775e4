"""Redis key names of the application database, in one place.

Every key of a campaign carries the campaign id in a hash tag (``{cid}``) so a cluster keeps a
campaign's keys on one slot and the Lua scripts may touch several of them.
"""

from __future__ import annotations

__all__ = [
    "CAMPAIGNS",
    "WORKER_SPEED",
    "batch",
    "control",
    "counters",
    "dead_letters",
    "manifest",
    "records",
    "staged_batch",
    "worker_alive",
]

PREFIX = "dp"
#: Sorted set of campaign ids by creation time.
CAMPAIGNS = f"{PREFIX}:campaigns"
#: Hash of the workers' machine-speed probes: worker id -> probe microseconds (dispatch.calibration).
WORKER_SPEED = f"{PREFIX}:workers:speed"


def manifest(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:manifest"


def batch(cid: str, n: int) -> str:
    return f"{PREFIX}:{{{cid}}}:b:{n}"


def staged_batch(cid: str, token: str, n: int) -> str:
    """Batch ``n`` of a plan still being written (``token``: that planning attempt); renamed to
    :func:`batch` when the plan commits (``dispatch.snapshot``)."""
    return f"{PREFIX}:{{{cid}}}:stage:{token}:b:{n}"


def records(cid: str, n: int) -> str:
    return f"{PREFIX}:{{{cid}}}:m:{n}"


def counters(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:counters"


def control(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:control"


def dead_letters(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:dlq"


def worker_alive(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"
