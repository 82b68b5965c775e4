"""``dispatch funnel submit|run`` and ``dispatch report``: multi-round campaigns from the CLI."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import redis

from dispatch.config import Settings
from dispatch.errors import CampaignNotFound
from dispatch.plan.planner import Planner
from dispatch.rounds.funnel import find_funnel, load_funnel_file, register_funnel
from dispatch.rounds.report import (
    RoundReport,
    parse_prices,
    render_funnel_png,
    report_csv,
    report_json,
    round_report,
)
from dispatch.rounds.scheduler import DEFAULT_INTERVAL_S, RoundScheduler
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.store.connect import resolve_redis

__all__ = ["add_commands", "cmd_funnel", "cmd_report", "reports_for"]


def reports_for(client: redis.Redis, name: str, settings: Settings) -> list[RoundReport]:
    """The reports of campaign ``name``, or of every round of funnel ``name`` that was planned."""
    prices = parse_prices(settings.prices)
    funnel = find_funnel(client, name)
    if funnel is None:
        return [round_report(client, name, prices)]
    out = []
    for round_ in funnel.rounds:
        try:
            out.append(round_report(client, round_.spec.id, prices))
        except CampaignNotFound:
            continue  # not planned yet
    return out


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    client = redis.Redis.from_url(resolve_redis(settings).app_url)
    try:
        reports = reports_for(client, args.name, settings)
    finally:
        client.close()
    if args.format == "png":
        data = render_funnel_png(reports)
        if args.out is None:
            sys.stdout.buffer.write(data)
        else:
            args.out.write_bytes(data)
        return 0
    text = (
        report_csv(reports)
        if args.format == "csv"
        else orjson.dumps(report_json(reports), option=orjson.OPT_INDENT_2).decode() + "\n"
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


def cmd_funnel(args: argparse.Namespace, settings: Settings) -> int:
    target = resolve_redis(settings)
    client = redis.Redis.from_url(target.app_url)
    broker = build_broker(settings, target.broker_url)
    try:
        if args.action == "submit":
            funnel = load_funnel_file(args.file)
            new = register_funnel(client, funnel)
            print(f"funnel {funnel.id}: {len(funnel.rounds)} rounds {'registered' if new else 'already registered'}")
        control = CampaignControl(
            client, lambda cid, n, d: enqueue_batch(broker, cid, n, d), retention_s=settings.retention_s
        )
        scheduler = RoundScheduler(client, control, lambda: Planner.for_settings(client, settings))
        if args.action == "status":
            found = find_funnel(client, args.funnel)
            if found is None:
                raise CampaignNotFound(f"no funnel {args.funnel!r} is registered")
            for state in scheduler.states(found):
                print(orjson.dumps(state).decode())
            return 0
        if args.action == "run":
            stop = threading.Event()
            try:
                scheduler.run(stop, args.interval)
            except KeyboardInterrupt:
                stop.set()
            return 0
        for tick in scheduler.tick():  # submit: start what is due now (round 1)
            print(f"{tick.campaign_id}: {tick.outcome}{' ' + tick.detail if tick.detail else ''}")
        return 0
    finally:
        broker.close()
        client.close()


def add_commands(sub: Any) -> None:
    """Register ``funnel`` and ``report``."""
    p = sub.add_parser("funnel", help="multi-round campaigns: submit a funnel file, run the round scheduler")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("submit", help="register a funnel file and start its first round")
    a.add_argument("file", type=Path, help="the funnel file (TOML, see README 'Follow-up rounds')")
    a = actions.add_parser("status", help="each round's state (waiting, claimed, started, empty, failed) as JSON")
    a.add_argument("funnel", help="a registered funnel id")
    a = actions.add_parser("run", help="start each registered funnel's rounds when due (runs until stopped)")
    a.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between scans")
    p.set_defaults(handler=cmd_funnel, uses_redis="always")

    p = sub.add_parser("report", help="per-round report of a campaign or funnel: counts, rates, cost, timing")
    p.add_argument("name", help="a campaign id or a registered funnel id")
    p.add_argument("--format", choices=("json", "csv", "png"), default="json", help="output format")
    p.add_argument("--out", type=Path, default=None, help="write to this file (default: stdout)")
    p.set_defaults(handler=cmd_report, uses_redis="always")
