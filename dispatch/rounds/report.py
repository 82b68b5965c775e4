"""Round reports: per round (campaign), per channel and per provider, as JSON, CSV and a PNG chart.

Counts (each message counted once, from stores that count once by construction):

- ``audience``: rows the round's plan read; ``accepted``: recipients frozen in its snapshot;
- ``sent``: messages the provider accepted; ``delivered``, ``undelivered``, ``bounced``: their
  delivery receipts; ``failed``: sends the provider refused (all from the campaign's counters,
  moved once per message by the tracking scripts, ``dispatch.send.tracking``);
- ``human_opens``, ``machine_opens``, ``clicks``, ``bot_clicks``, ``replies``, ``optouts``,
  ``spam_reports``: messages with at least one such event (the engagement ledger's counters,
  ``dispatch.engage.ledger``: first occurrence per message and event).

Rates (None when their denominator is 0):

- ``delivery_rate = delivered / sent``, only when the channel reports delivery (some receipt
  arrived: ``delivered + undelivered + bounced > 0``), else None;
- the *base* is ``delivered`` when the channel reports delivery, else ``sent``;
- ``open_rate = human_opens / base`` (machine opens never count), ``click_rate = clicks / base``
  (bot clicks never count).

``cost = sent * price`` with the provider's price from the ``prices`` setting
(``DISPATCH_PRICES="twilio=0.0079,sendgrid=0.0009"``; None when the provider has none).
Timing: the predicted window, ``predicted_start`` (the start once started, else when it was
planned) to ``predicted_finish`` (that + the plan's predicted duration), against the actual one,
``started_at`` to ``ended_at`` (None while it runs).

Provider: the channel's default provider in the registry (a campaign sends through one today).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import redis

from channels import default_registry
from dispatch.engage.ledger import engagement_counters
from dispatch.errors import CampaignNotFound, ConfigError
from dispatch.plan.snapshot import load_manifest
from dispatch.send.control import CampaignControl
from dispatch.send.tracking import campaign_counters
from monitoring.chart import BLACK, GRID, Canvas
from monitoring.metrics import Metrics

__all__ = [
    "RoundReport",
    "parse_prices",
    "publish_report",
    "render_funnel_png",
    "report_csv",
    "report_json",
    "round_report",
    "rounds_report",
    "totals",
]

#: Counts summed into channel and provider totals.
_SUMMED: Final = (
    "audience",
    "accepted",
    "sent",
    "delivered",
    "undelivered",
    "bounced",
    "failed",
    "human_opens",
    "machine_opens",
    "clicks",
    "bot_clicks",
    "replies",
    "optouts",
    "spam_reports",
)


def parse_prices(text: str) -> dict[str, float]:
    """``"twilio=0.0079,sendgrid=0.0009"`` -> {provider: price per message}; ConfigError naming the
    bad entry."""
    out: dict[str, float] = {}
    for n, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            price = float(value) if sep else -1.0
        except ValueError:
            price = -1.0
        if not name.strip() or not math.isfinite(price) or price < 0:
            raise ConfigError(
                "DISPATCH_PRICES", f"entry {n + 1} ({part[:40]!r}) is not provider=price", "write e.g. twilio=0.0079"
            )
        out[name.strip()] = price
    return out


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReport:
    campaign_id: str
    channel: str
    provider: str
    derived_from: str | None
    where: str | None
    audience: int
    accepted: int
    sent: int
    delivered: int
    undelivered: int
    bounced: int
    failed: int
    human_opens: int
    machine_opens: int
    clicks: int
    bot_clicks: int
    replies: int
    optouts: int
    spam_reports: int
    delivery_rate: float | None
    open_rate: float | None
    click_rate: float | None
    cost: float | None
    predicted_start: float | None
    predicted_finish: float | None
    started_at: float | None
    ended_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rates(counts: Mapping[str, int]) -> dict[str, float | None]:
    """The three rates of ``counts`` (see the module docstring)."""
    reported = counts["delivered"] + counts["undelivered"] + counts["bounced"] > 0
    base = counts["delivered"] if reported else counts["sent"]
    return {
        "delivery_rate": _ratio(counts["delivered"], counts["sent"]) if reported else None,
        "open_rate": _ratio(counts["human_opens"], base),
        "click_rate": _ratio(counts["clicks"], base),
    }


def round_report(client: redis.Redis, campaign_id: str, prices: Mapping[str, float]) -> RoundReport:
    """One campaign's report (CampaignNotFound when it has no manifest)."""
    manifest = load_manifest(client, campaign_id)
    counters = campaign_counters(client, campaign_id)
    events = engagement_counters(client, campaign_id)
    status = CampaignControl(client).status(campaign_id, speed=False)
    provider = default_registry().provider_for(manifest.channel).name
    counts = {
        "audience": manifest.total,
        "accepted": manifest.accepted,
        "sent": counters["sent"],
        "delivered": counters["delivered"],
        "undelivered": counters["undelivered"],
        "bounced": counters["bounced"],
        "failed": counters["failed"],
        "human_opens": events["open"],
        "machine_opens": events["machine_open"],
        "clicks": events["click"],
        "bot_clicks": events["bot_click"],
        "replies": events["reply"],
        "optouts": events["optout"],
        "spam_reports": events["spamreport"],
    }
    price = prices.get(provider)
    lineage = manifest.lineage or {}
    rated = rates(counts)
    predicted_start = status.started_at if status.started_at is not None else manifest.created_at
    return RoundReport(
        campaign_id=campaign_id,
        channel=manifest.channel,
        provider=provider,
        derived_from=lineage.get("from"),
        where=lineage.get("where"),
        audience=counts["audience"],
        accepted=counts["accepted"],
        sent=counts["sent"],
        delivered=counts["delivered"],
        undelivered=counts["undelivered"],
        bounced=counts["bounced"],
        failed=counts["failed"],
        human_opens=counts["human_opens"],
        machine_opens=counts["machine_opens"],
        clicks=counts["clicks"],
        bot_clicks=counts["bot_clicks"],
        replies=counts["replies"],
        optouts=counts["optouts"],
        spam_reports=counts["spam_reports"],
        delivery_rate=rated["delivery_rate"],
        open_rate=rated["open_rate"],
        click_rate=rated["click_rate"],
        cost=None if price is None else round(counts["sent"] * price, 6),
        predicted_start=predicted_start,
        predicted_finish=predicted_start + manifest.predicted_duration_s,
        started_at=status.started_at,
        ended_at=status.ended_at,
    )


def rounds_report(client: redis.Redis, campaign_id: str, prices: Mapping[str, float]) -> list[RoundReport]:
    """The report of ``campaign_id``, then of every registered funnel round derived from it
    (directly or through another round) that was planned, in funnel order."""
    from dispatch.rounds.funnel import registered_funnels

    out = [round_report(client, campaign_id, prices)]
    wanted = {campaign_id}
    for funnel in registered_funnels(client):
        for round_ in funnel.rounds:
            if round_.follow is not None and round_.follow.source in wanted and round_.spec.id not in wanted:
                wanted.add(round_.spec.id)
                try:
                    out.append(round_report(client, round_.spec.id, prices))
                except CampaignNotFound:
                    continue  # not planned yet
    return out


def publish_report(metrics: Metrics, report: RoundReport) -> None:
    """The report's counts as the ``dispatch_engagement_messages`` gauges (Grafana's engagement row)."""
    metrics.set_engagement(report.campaign_id, report.channel, {name: getattr(report, name) for name in _SUMMED})


def totals(reports: Sequence[RoundReport], key: str) -> dict[str, dict[str, Any]]:
    """Counts, rates and cost summed over ``reports`` grouped by ``key`` (channel or provider)."""
    out: dict[str, dict[str, Any]] = {}
    for report in reports:
        group = out.setdefault(getattr(report, key), {**dict.fromkeys(_SUMMED, 0), "cost": None})
        for name in _SUMMED:
            group[name] += getattr(report, name)
        if report.cost is not None:
            group["cost"] = round((group["cost"] or 0.0) + report.cost, 6)
    for group in out.values():
        group.update(rates(group))
    return out


def report_json(reports: Sequence[RoundReport]) -> dict[str, Any]:
    return {
        "rounds": [r.as_dict() for r in reports],
        "channels": totals(reports, "channel"),
        "providers": totals(reports, "provider"),
    }


def report_csv(reports: Sequence[RoundReport]) -> str:
    """One row per round, columns in :class:`RoundReport` order (ids and counts only: safe cells)."""
    out = io.StringIO()
    names = [f.name for f in fields(RoundReport)]
    writer = csv.writer(out)
    writer.writerow(names)
    for report in reports:
        writer.writerow(["" if (v := getattr(report, n)) is None else v for n in names])
    return out.getvalue()


_BARS: Final = (("SENT", "sent"), ("DELIVERED", "delivered"), ("OPENED", "human_opens"), ("CLICKED", "clicks"))
_COLOURS: Final = ((70, 110, 200), (60, 160, 90), (230, 150, 40), (200, 60, 60))


def render_funnel_png(reports: Sequence[RoundReport]) -> bytes:
    """A funnel chart: per round, bars of sent, delivered, human opens and clicks (scaled to the
    largest round's sent), labelled with the counts."""
    width, row_h, top = 720, 110, 30
    canvas = Canvas(width, top + row_h * max(1, len(reports)) + 10)
    canvas.text(10, 8, "FUNNEL: SENT / DELIVERED / OPENED / CLICKED", BLACK, 2)
    largest = max([r.sent for r in reports] + [1])
    left, span = 150, width - 170
    for i, report in enumerate(reports):
        y = top + i * row_h
        canvas.line(0, y, width - 1, y, GRID)
        canvas.text(10, y + 8, report.campaign_id[:16].upper(), BLACK, 2)
        canvas.text(10, y + 28, report.channel.upper(), BLACK, 2)
        for j, ((label, name), colour) in enumerate(zip(_BARS, _COLOURS, strict=True)):
            value = int(getattr(report, name))
            by = y + 8 + j * 24
            canvas.rect(left, by, left + max(1, span * value // largest), by + 16, colour)
            canvas.text(left + 4, by + 4, f"{label} {value}", BLACK, 2 if value * span // largest > 150 else 1)
    return canvas.png()
