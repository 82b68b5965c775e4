"""Redis key names of the application database, in one place.

Every key of a campaign carries the campaign id in a hash tag (``{cid}``) so a cluster keeps a
campaign's keys on one slot and the Lua scripts may touch several of them. A campaign's keys are
therefore only as separate as its id: the ids of triggered campaigns (:data:`TRIGGERED_PREFIX`)
hold a ``:``, which no client-chosen id may hold (``dispatch.campaign.CampaignSpec``), so no
campaign a client creates can reach their keys.
"""

from __future__ import annotations

__all__ = [
    "CAMPAIGNS",
    "EVIDENCE_WORKERS",
    "RESERVED_ID_PREFIX",
    "TRIGGERED_PREFIX",
    "WORKER_SPEED",
    "batch",
    "control",
    "counters",
    "dead_letters",
    "evidence",
    "is_triggered",
    "manifest",
    "progress",
    "records",
    "staged_batch",
    "worker_alive",
]

PREFIX = "dp"
#: Sorted set of campaign ids by creation time.
CAMPAIGNS = f"{PREFIX}:campaigns"
#: Hash of the workers' machine-speed probes: worker id -> probe microseconds (dispatch.plan.calibration).
WORKER_SPEED = f"{PREFIX}:workers:speed"
#: Sorted set of the workers that published send evidence: worker id -> last time (dispatch.plan.evidence).
EVIDENCE_WORKERS = f"{PREFIX}:evidence:workers"
#: Ids of triggered campaigns start with this (``triggered:sms-2026112512``); ':' is outside the
#: alphabet of client-chosen campaign ids.
TRIGGERED_PREFIX = "triggered:"
#: Client-chosen campaign ids may not start with this: triggered campaigns' ids did until their
#: prefix became :data:`TRIGGERED_PREFIX` (such campaigns may still be in Redis).
RESERVED_ID_PREFIX = "triggered-"


def is_triggered(cid: str) -> bool:
    """Whether ``cid`` names a triggered campaign (either prefix)."""
    return cid.startswith((TRIGGERED_PREFIX, RESERVED_ID_PREFIX))


def manifest(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:manifest"


def batch(cid: str, n: int) -> str:
    return f"{PREFIX}:{{{cid}}}:b:{n}"


def staged_batch(cid: str, token: str, n: int) -> str:
    """Batch ``n`` of a plan still being written (``token``: that planning attempt); renamed to
    :func:`batch` when the plan commits (``dispatch.plan.snapshot``)."""
    return f"{PREFIX}:{{{cid}}}:stage:{token}:b:{n}"


def records(cid: str, n: int) -> str:
    return f"{PREFIX}:{{{cid}}}:m:{n}"


def counters(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:counters"


def control(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:control"


def dead_letters(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:dlq"


def progress(cid: str) -> str:
    """Ring of recent ``time:count`` progress samples, newest first (``dispatch.send.control``)."""
    return f"{PREFIX}:{{{cid}}}:progress"


def worker_alive(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def evidence(channel: str, provider: str) -> str:
    """Hash of a channel's and provider's running send statistics (``dispatch.plan.evidence``)."""
    return f"{PREFIX}:evidence:{channel}:{provider}"
