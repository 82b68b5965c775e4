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
    "FUNNELS",
    "RESERVED_ID_PREFIX",
    "SWEEPER",
    "TRIGGERED_PREFIX",
    "WORKER_SPEED",
    "batch",
    "control",
    "counters",
    "dead_letters",
    "done_batches",
    "engagement",
    "engagement_counters",
    "evidence",
    "is_triggered",
    "manifest",
    "progress",
    "records",
    "round_state",
    "run_member",
    "staged_batch",
    "worker_alive",
    "worker_runs",
]

PREFIX = "dp"
#: Sorted set of campaign ids by creation time.
CAMPAIGNS = f"{PREFIX}:campaigns"
#: Hash of registered funnels: funnel id -> the funnel as JSON (``dispatch.rounds.funnel``).
FUNNELS = f"{PREFIX}:funnels"
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


def engagement(cid: str, n: int) -> str:
    """Hash of batch ``n``'s engagement: field ``<index>.<event>`` -> first time (epoch ms)."""
    return f"{PREFIX}:{{{cid}}}:e:{n}"


def engagement_counters(cid: str) -> str:
    """Hash of a campaign's engagement counts: event -> messages with that event (each once)."""
    return f"{PREFIX}:{{{cid}}}:engagement"


def done_batches(cid: str) -> str:
    """Set of a campaign's batch numbers whose every message has its final outcome."""
    return f"{PREFIX}:{{{cid}}}:done"


#: The sweeper's election key: one worker at a time looks for stalled campaigns.
SWEEPER = f"{PREFIX}:sweeper"


def dead_letters(cid: str) -> str:
    return f"{PREFIX}:{{{cid}}}:dlq"


def progress(cid: str) -> str:
    """Ring of recent ``time:count`` progress samples, newest first (``dispatch.send.control``)."""
    return f"{PREFIX}:{{{cid}}}:progress"


def worker_runs(worker_id: str) -> str:
    """Set of the batches a live worker is sending now (``<campaign>|<batch>``), from its heartbeat:
    a batch's lease (``claim.lua``) held by a live worker that is not sending it is stale."""
    return worker_alive(worker_id) + ":runs"


def run_member(cid: str, batch: int) -> str:
    return f"{cid}|{batch}"


def worker_alive(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def round_state(cid: str) -> str:
    """Hash of a funnel round's start: its claim (owner, lease), when its source ended, and
    whether it started (``dispatch.rounds.scheduler``)."""
    return f"{PREFIX}:{{{cid}}}:round"


def evidence(channel: str, provider: str) -> str:
    """Hash of a channel's and provider's running send statistics (``dispatch.plan.evidence``)."""
    return f"{PREFIX}:evidence:{channel}:{provider}"
