"""Planning commands of the ``dispatch`` CLI: suppression lists and the full plan report.

    dispatch suppress add CHANNEL ADDRESS...        (CHANNEL: sms, email, push, webhook or global)
    dispatch suppress remove CHANNEL ADDRESS...
    dispatch suppress import CHANNEL FILE [--hashes]   one address (or exported hash) per line
    dispatch suppress export CHANNEL [--output FILE]   hashes, never addresses
    dispatch suppress count CHANNEL
    dispatch plan CAMPAIGN_FILE --audience SOURCE [--query SQL] [--json]
    dispatch plan CAMPAIGN_FILE --audience source:NAME [--json]     (a configured source)

Addresses are normalized the way the planner normalizes them before they are hashed (E.164
phones, lowercased email domains), so ``+44 7400 123456`` and ``+447400123456`` are one entry;
an address that does not validate is refused (``add``) or counted as invalid (``import``). For
``global`` an address containing ``@`` is taken as an email, anything else as a phone.

The plan command checks suppression lists and, when ``frequency_limit`` is set in the
settings, the frequency cap. ``SOURCE`` is a CSV/JSONL file (optionally gzip), a
``postgresql://`` DSN read with ``--query`` through a server-side cursor, or ``source:NAME``, a
source configured in the settings (``[sources.NAME]``, see ``dispatch.config``). With ``--api``,
``source:NAME`` names a source configured on the API server, which reads it. It registers as
``plan`` when the core CLI has no ``plan`` command, otherwise as ``plan-campaign``.
``--region GB`` sets the campaign's ``region`` (national phone numbers are read as that
country's) when the file sets none, locally and with ``--api`` alike; a file that sets another
region is refused rather than overridden. The report ends with hints when rejections have a
known remedy (national numbers and no region to read them).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
import redis

from channels import default_registry
from dispatch.campaign import CampaignSpec, load_campaign_file
from dispatch.config import Settings
from dispatch.errors import ConfigError, PlanError
from dispatch.plan.planner import Planner, PlanReport
from dispatch.plan.sources import find_source, parse_reference, plan_from_source, plan_postgres
from dispatch.rules.suppression import GLOBAL, SuppressionStore, check_suppression_key, hasher_for
from dispatch.rules.validation import AddressValidator, parse_region
from dispatch.store.connect import resolve_redis

__all__ = ["add_commands", "format_report", "normalizer"]

#: Suppression lists the command line serves: one per registered channel (also one without a
#: provider yet, so its addresses can be suppressed ahead of time), and the global one.
CHANNELS: Final = (*default_registry().channel_names(), GLOBAL)


def normalizer(channel: str, region: str | None = None) -> Callable[[str], str | None]:
    """The planner's normalization for ``channel``'s addresses (None: not a valid address)."""
    validator = AddressValidator(region)
    # any valid phone number can be suppressed, SMS-capable or not
    any_phone = channel != GLOBAL and validator.registry.channel(channel).address_kind == "sms_number"

    def normalize(raw: str) -> str | None:
        if channel == GLOBAL:
            reason, address = validator.check_any(raw)
        elif any_phone:
            reason, address = validator.check_phone(raw, sms=False)
        else:
            reason, address = validator.check(channel, raw)
        return None if reason is not None else address

    return normalize


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(resolve_redis(settings).app_url)


def cmd_suppress(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    try:
        hasher = hasher_for(settings)
        check_suppression_key(client, hasher)
        store = SuppressionStore(client, hasher=hasher)
        normalize = normalizer(args.channel, args.region)
        if args.action in ("add", "remove"):
            addresses = [normalize(a) for a in args.addresses]
            bad = [i + 1 for i, a in enumerate(addresses) if a is None]
            if bad:
                raise PlanError(f"address(es) number {', '.join(map(str, bad))} are not valid {args.channel} addresses")
            valid = [a for a in addresses if a is not None]
            changed = store.add(args.channel, valid) if args.action == "add" else store.remove(args.channel, valid)
            print(f"{args.channel}: {changed} {'added' if args.action == 'add' else 'removed'}")
        elif args.action == "import":
            if args.hashes:
                with args.file.open(encoding="utf-8") as handle:
                    print(f"{args.channel}: {store.import_hashes(args.channel, handle)} added")
            else:
                result = store.import_file(args.file, args.channel, normalize)
                print(f"{args.channel}: {result.added} added, {result.invalid} invalid lines skipped")
        elif args.action == "export":
            out: TextIO = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
            try:
                for digest in store.export(args.channel):
                    out.write(digest + "\n")
            finally:
                if args.output:
                    out.close()
        else:
            print(store.count(args.channel))
    except OSError as exc:
        target = getattr(args, "file", None) or getattr(args, "output", None)
        raise PlanError(f"cannot use {target}: {exc.strerror}") from None
    finally:
        client.close()
    return 0


def format_report(report: PlanReport) -> str:
    """The plan report for people: counts by reason, batches, schedule, prediction, verdict."""
    p = report.prediction
    lines = [f"campaign {report.campaign_id}{' (already planned: the existing plan)' if report.existing else ''}"]
    lines.append(f"  rows         {report.total:>12,}")
    lines.append(f"  accepted     {report.accepted:>12,}")
    for reason, n in sorted(report.rejected.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<12} {n:>12,}")
    lines.append(f"  batches      {report.batches:>12,}   cost units {report.cost_units:,}")
    for group in report.extra.get("schedule") or []:
        when = datetime.fromtimestamp(group["not_before"], UTC).isoformat(timespec="minutes")
        lines.append(f"  due {when}  {group['recipients']:>10,} recipients in {group['batches']:,} batches")
    start = datetime.fromtimestamp(p["start"], UTC).isoformat(timespec="seconds")
    finish = datetime.fromtimestamp(p["finish"], UTC).isoformat(timespec="seconds")
    speed = p.get("speed_factor", 1.0)
    measured = f", machine {speed:.2f}x the reference's CPU time" if speed != 1.0 else ""
    lines.append(f"  prediction   {p['rate']:,.1f} msg/s ({p['bottleneck']}{measured}), {p['duration_s']:,.0f} s")
    if p.get("finish_high"):
        lines.append(
            f"  range        {p['duration_low_s']:,.0f}-{p['duration_high_s']:,.0f} s (p10-p90; {_range_basis(p)})"
        )
    lines.append(f"               start {start}, finish {finish}")
    if p.get("finish_high"):
        low = datetime.fromtimestamp(p["finish_low"], UTC).isoformat(timespec="seconds")
        high = datetime.fromtimestamp(p["finish_high"], UTC).isoformat(timespec="seconds")
        lines.append(f"               finish between {low} and {high}")
    lines.append(f"  verdict      {p['verdict']}: {p['advice']}")
    if report.rejected_file:
        unlisted = report.extra.get("rejected_unlisted") or 0
        more = f" ({unlisted:,} more rejected rows counted but not listed: file size cap)" if unlisted else ""
        lines.append(f"  rejected rows: {report.rejected_file}{more}")
    lines.extend(f"  hint: {hint}" for hint in report.extra.get("hints") or ())
    return "\n".join(lines)


#: What the plan's speed factor was measured from, in the report's words.
SPEED_SOURCES: Final = {
    "evidence": "this deployment's recent sends",
    "workers": "the workers' speed probes",
    "local": "a speed probe of this machine",
    "off": "speed not measured: rate limits or size decide",
}


def _range_basis(p: dict[str, Any]) -> str:
    parts = [SPEED_SOURCES.get(str(p.get("speed_source")), str(p.get("speed_source")))]
    if p.get("speed_spread"):
        parts.append(f"speed spread +-{p['speed_spread']:.0%}")
    if p.get("busy_cores"):
        parts.append(f"{p['busy_cores']:.1f} cores busy with other work while planning")
    return ", ".join(parts)


def _region(in_file: Any, flag: str | None) -> str | None:
    """The region ``--region`` gives the campaign (None: leave the file's as it is)."""
    if flag is None:
        return None
    if in_file not in (None, "") and parse_region(str(in_file)) != parse_region(flag):
        raise PlanError(f"the campaign file sets region = {in_file!r} and --region says {flag!r}: give one")
    return flag  # checked by the spec, with its message


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    if settings.api_url is not None:
        return _plan_through_api(args, settings)
    spec = load_campaign_file(args.campaign_file)
    region = _region(spec.region, args.region)
    if region is not None:
        spec = CampaignSpec.from_mapping({**spec.as_json(), "region": region})
    client = _client(settings)
    try:
        planner = Planner.for_settings(client, settings)
        source: str = args.audience
        named = parse_reference(source)
        if source.startswith(("postgresql://", "postgres://")):
            if not args.query:
                raise PlanError("a PostgreSQL audience needs --query")
            report = plan_postgres(planner, spec, source, args.query, what="the audience database")
        elif args.query:
            raise PlanError("--query is only for a postgresql:// audience (a source:NAME has its own query)")
        elif named is not None:
            report = plan_from_source(planner, spec, find_source(settings, named))
        else:
            report = planner.plan_file(spec, Path(source))
    finally:
        client.close()
    if args.json:
        data: dict[str, Any] = {**report.as_dict(), **report.extra}
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(report))
    return 0


def _plan_through_api(args: argparse.Namespace, settings: Settings) -> int:
    """``--api``: the campaign file and audience go to the API, which plans with the same checks."""
    from dispatch.api.client import DispatchClient

    if not settings.api_token:
        raise ConfigError("DISPATCH_API_TOKEN", "--api needs a token", "pass --token or set DISPATCH_API_TOKEN")
    if args.audience.startswith(("postgresql://", "postgres://")):
        raise PlanError(
            "a PostgreSQL audience is read by the planning process: plan it without --api, or configure it "
            "as a source on the API server and pass --audience source:NAME"
        )
    if args.query:
        raise PlanError("--query is only for a postgresql:// audience (a source:NAME has its own query)")
    checked = load_campaign_file(args.campaign_file)  # the same validation and messages as a local plan
    raw = args.campaign_file.read_bytes()
    spec: dict[str, Any] = tomllib.loads(raw.decode()) if args.campaign_file.suffix == ".toml" else orjson.loads(raw)
    region = _region(spec.get("region"), args.region)
    if region is not None:
        spec["region"] = CampaignSpec.from_mapping({**checked.as_json(), "region": region}).region
    client = DispatchClient(settings.api_url or "", settings.api_token.reveal())
    named = parse_reference(args.audience)
    if named is not None:
        report = client.create_campaign(spec, source=named)  # the server's source of that name
    else:
        report = client.create_campaign(spec, audience=Path(args.audience))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json else format_api_report(report))
    return 0


def format_api_report(report: dict[str, Any]) -> str:
    lines = [f"{key:>14}: {value}" for key, value in report.items() if not isinstance(value, dict | list)]
    lines += [
        f"{key:>14}: {orjson.dumps(value).decode()}" for key, value in report.items() if isinstance(value, dict | list)
    ]
    return "\n".join(lines)


def add_commands(sub: Any) -> None:
    """Register ``suppress`` and the planning command on the CLI's subparsers."""
    channel_help = "a channel's list, or global (checked for every channel; '@' makes an email, else a phone)"
    p = sub.add_parser("suppress", help="suppression lists: add, remove, import, export, count")
    actions = p.add_subparsers(dest="action", required=True)
    for action in ("add", "remove"):
        a = actions.add_parser(action, help=f"{action} addresses")
        a.add_argument("channel", choices=CHANNELS, help=channel_help)
        a.add_argument(
            "addresses", nargs="+", help=f"addresses to {action} (normalized first: E.164 phones, email domains)"
        )
    a = actions.add_parser("import", help="add one address (or hash, with --hashes) per line")
    a.add_argument("channel", choices=CHANNELS, help=channel_help)
    a.add_argument("file", type=Path, help="text file, one address (or exported hash) per line")
    a.add_argument("--hashes", action="store_true", help="the file holds hashes from 'export'")
    a = actions.add_parser("export", help="write the suppressed hashes (not addresses)")
    a.add_argument("channel", choices=CHANNELS, help=channel_help)
    a.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    a = actions.add_parser("count", help="how many entries a list holds")
    a.add_argument("channel", choices=CHANNELS, help=channel_help)
    for a in actions.choices.values():
        a.add_argument(
            "--region", default=None, help="default region of national phone numbers, e.g. US (default: none)"
        )
    p.set_defaults(handler=cmd_suppress, uses_redis="always")

    name = "plan" if "plan" not in sub.choices else "plan-campaign"
    p = sub.add_parser(name, help="plan a campaign with every check: counts by reason, batches, prediction")
    p.add_argument("campaign_file", type=Path, help="campaign file, TOML or JSON (id, channel, body, ...)")
    p.add_argument(
        "--audience",
        required=True,
        help="CSV/JSONL file (optionally .gz), postgresql:// DSN (with --query), or source:NAME (a configured source)",
    )
    p.add_argument("--query", default=None, help="SQL query for a PostgreSQL audience")
    p.add_argument(
        "--region",
        default=None,
        help="the campaign's region: national phone numbers are read as this country's (ISO 3166, e.g. US)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_plan, uses_redis="without_api")
