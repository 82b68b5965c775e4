"""The ``dispatch`` command line."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
import redis

from dispatch.api.client import DispatchClient
from dispatch.cli.status import reader_zone, render, watch, watch_interval
from dispatch.config import Settings, load_settings
from dispatch.credentials import redact_url
from dispatch.csvsafe import safe_cell, safe_row
from dispatch.errors import ConfigError, DispatchError
from dispatch.plan.snapshot import load_manifest
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl, parse_rate
from dispatch.send.tracking import iter_outcomes
from dispatch.store import keys
from dispatch.store.connect import RedisTarget, resolve_redis
from dispatch.store.embedded import find_embedded, stop_embedded

__all__ = ["CommandParser", "HelpFormatter", "announce_embedded", "build_parser", "main"]

Handler = Callable[[argparse.Namespace, Settings], int]

#: Modules that register their own subcommands (see ``build_parser``).
COMMAND_MODULES = ("dispatch.api.app", "dispatch.cli.plan", "dispatch.cli.rounds")
#: Entry-point group of installed packages that add subcommands (``add_commands(sub)``).
COMMAND_PLUGINS = "dispatch.commands"
#: ``set_defaults(uses_redis=...)`` of a command that uses the deployment's Redis: always, or only
#: when it does not go through the API (``--api``). Before such a command runs, ``main`` finds (or
#: starts) the server, and says so when it started the embedded one.
USES_REDIS_ALWAYS = "always"
USES_REDIS_WITHOUT_API = "without_api"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, except where there is none to show: ``None`` (the
    help then says what applies instead, usually a setting) and a flag's ``False``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of ``dispatch`` and of each subcommand (subparsers are built with the parent's
    class, so commands added by other rooms and plugins show their defaults too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def announce_embedded(target: RedisTarget) -> None:
    """Tell the user, on stderr, when this command started the embedded server: it keeps running
    in the background after the command ends, holding the deployment's data."""
    if target.started_embedded and target.embedded_home is not None:
        home = target.embedded_home
        print(
            f"dispatch: started an embedded Valkey server for DISPATCH_HOME={home} (data in {home / 'valkey-data'}); "
            "it keeps running in the background: stop it with `dispatch redis stop`",
            file=sys.stderr,
            flush=True,
        )


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(resolve_redis(settings).app_url)


def _control(settings: Settings) -> tuple[CampaignControl, Callable[[], None]]:
    target = resolve_redis(settings)
    client = redis.Redis.from_url(target.app_url)
    broker = build_broker(settings, target.broker_url)

    def close() -> None:
        broker.close()
        client.close()

    enqueue = lambda cid, n, delay: enqueue_batch(broker, cid, n, delay)  # noqa: E731
    return CampaignControl(client, enqueue, retention_s=settings.retention_s), close


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from dispatch.logs import configure_logging
    from dispatch.send.worker import run_worker

    configure_logging(settings.log_format)
    return run_worker(settings, threads=args.threads, metrics_port=args.metrics_port)


def _api(settings: Settings) -> DispatchClient | None:
    """The API client when ``--api``/``DISPATCH_API_URL`` is set: commands then go over HTTP."""
    if settings.api_url is None:
        return None
    if not settings.api_token:
        raise ConfigError("DISPATCH_API_TOKEN", "--api needs a token", "pass --token or set DISPATCH_API_TOKEN")
    return DispatchClient(settings.api_url, settings.api_token.reveal())


def _simple(action: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        api = _api(settings)
        if api is not None:
            result = getattr(api, action)(args.campaign)
            print(f"{args.campaign}: {result.get('state', action)}")
            return 0
        control, close = _control(settings)
        try:
            if action == "start":
                started = control.start(args.campaign)
                print(f"{args.campaign}: {'started' if started else 'already started'}")
            else:
                getattr(control, action)(args.campaign)
                print(f"{args.campaign}: {action} requested")
        finally:
            close()
        return 0

    return run


def cmd_retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    control, close = _control(settings)
    try:
        messages, batches = control.retry_failed(args.campaign)
    finally:
        close()
    print(f"{args.campaign}: {messages} dead-lettered messages queued again in {batches} batches")
    return 0


def cmd_rate(args: argparse.Namespace, settings: Settings) -> int:
    rate = parse_rate(args.rate)
    api = _api(settings)
    if api is not None:
        api.set_rate(args.campaign, rate)
    else:
        control, close = _control(settings)
        try:
            control.set_rate(args.campaign, rate)
        finally:
            close()
    print(f"{args.campaign}: rate set to {'unlimited' if rate is None else rate}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    zone = reader_zone(utc=args.utc)
    tty = sys.stdout.isatty()

    def show(status: Any) -> None:
        if args.json:
            # one object per redraw: indented once, one line each under --watch
            option = orjson.OPT_INDENT_2 if args.watch is None else 0
            print(orjson.dumps(status, option=option).decode(), flush=True)
        else:
            clear = "\x1b[H\x1b[J" if args.watch is not None and tty else ""
            blank = "\n" if args.watch is not None and not tty else ""
            print(clear + render(status, zone=zone) + blank, flush=True)

    api = _api(settings)
    close: Callable[[], None] = lambda: None  # noqa: E731
    if api is not None:
        fetch: Callable[[], Any] = lambda: api.campaign(args.campaign)  # noqa: E731
    else:
        control, close = _control(settings)
        fetch = lambda: control.status(args.campaign).as_dict()  # noqa: E731
    try:
        if args.watch is None:
            show(fetch())
            return 0
        return watch(fetch, show, interval=args.watch)
    finally:
        close()


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    api = _api(settings)
    out: TextIO = args.output.open("w", newline="", encoding="utf-8") if args.output else sys.stdout
    if api is not None:
        try:
            items = list(api.messages(args.campaign))
            if args.format == "csv":
                dict_writer = csv.DictWriter(out, fieldnames=sorted({k for item in items for k in item}))
                dict_writer.writeheader()
                dict_writer.writerows({k: safe_cell(v) for k, v in item.items()} for item in items)
            else:
                for item in items:
                    out.write(orjson.dumps(item).decode() + "\n")
        finally:
            if args.output:
                out.close()
        return 0
    client = _client(settings)
    try:
        manifest = load_manifest(client, args.campaign)
        cancelled = client.hget(keys.control(args.campaign), "state") == b"cancelled"
        fields = ["batch", "index", "recipient_id", "state", "attempts", "provider", "provider_id", "code", "ts"]
        writer = csv.writer(out) if args.format == "csv" else None
        if writer is not None:
            writer.writerow(fields)
        for r in iter_outcomes(client, args.campaign, manifest.batches, cancelled=cancelled):
            row = [r.batch, r.index, r.recipient_id, r.state, r.attempts, r.provider, r.provider_id, r.code, r.ts]
            if writer is not None:
                writer.writerow(safe_row(row))
            else:
                out.write(orjson.dumps(dict(zip(fields, row, strict=True))).decode() + "\n")
    finally:
        if args.output:
            out.close()
        client.close()
    return 0


def cmd_redis(args: argparse.Namespace, settings: Settings) -> int:
    where = f"DISPATCH_HOME={settings.home}"
    if settings.redis_url is not None:
        where += f"; this deployment uses DISPATCH_REDIS_URL={redact_url(settings.redis_url)}"
    if args.action == "stop":
        print(f"stopped ({where})" if stop_embedded(settings.home) else f"no embedded server was running ({where})")
        return 0
    if args.action == "status":
        server = find_embedded(settings.home.resolve())
        print(f"running pid {server.pid} at {server.shown_url} ({where})" if server else f"not running ({where})")
        return 0 if server else 1
    target = resolve_redis(settings)
    announce_embedded(target)
    print(redact_url(target.app_url))  # the password stays in $DISPATCH_HOME/valkey.password
    return 0


def cmd_callbacks(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    import redis.asyncio as aredis
    import uvloop
    from aiohttp import web

    from dispatch.api.app import guarded_runner
    from dispatch.send.receipts import ReceiptSecrets, build_receipt_app

    providers = ReceiptSecrets.from_settings(settings).providers
    if not providers:
        raise ConfigError(
            "DISPATCH_SMS_AUTH_TOKEN, DISPATCH_SENDGRID_PUBLIC_KEY, DISPATCH_RECEIPT_WEBHOOK_SECRET",
            "no provider has a secret to verify its receipts by (the SMS auth token is the public demo default)",
            "set your Twilio auth token, SendGrid verification key or webhook receipt secret",
        )
    target = resolve_redis(settings)
    public = args.public_url or settings.callback_base_url or f"http://{args.host}:{args.port}"

    async def serve() -> None:
        client = aredis.Redis.from_url(target.app_url)
        app, _ = build_receipt_app(settings, client, public_base_url=public)
        runner = guarded_runner(app, settings)  # the API's header timeout and connection cap
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        routes = ", ".join(sorted({r.resource.canonical for r in app.router.routes() if r.resource is not None}))
        print(f"receipt endpoint listening on {args.host}:{args.port}, public URL {public}: {routes}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await client.aclose()

    uvloop.run(serve())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="dispatch",
        description="Plan, send and show message campaigns.",
        epilog="Settings come from DISPATCH_* variables (and --config); see the README's Configuration.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file (else DISPATCH_CONFIG)")
    parser.add_argument("--api", default=None, help="go through this dispatch API (else DISPATCH_API_URL)")
    parser.add_argument("--token", default=None, help="API bearer token (else DISPATCH_API_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    campaign_help = "campaign id (the id of its campaign file)"

    p = sub.add_parser("worker", help="run one worker process")
    p.add_argument("--threads", type=int, default=None, help="batches run at once (default: DISPATCH_WORKER_THREADS)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (default: DISPATCH_METRICS_PORT; 0 = none)",
    )
    p.set_defaults(handler=cmd_worker, uses_redis=USES_REDIS_ALWAYS)

    for action in ("start", "pause", "resume", "cancel"):
        p = sub.add_parser(action, help=f"{action} a campaign")
        p.add_argument("campaign", help=campaign_help)
        p.set_defaults(handler=_simple(action), uses_redis=USES_REDIS_WITHOUT_API)

    p = sub.add_parser("retry-failed", help="send a campaign's dead-lettered messages again (only those)")
    p.add_argument("campaign", help=campaign_help)
    p.set_defaults(handler=cmd_retry_failed, uses_redis=USES_REDIS_ALWAYS)

    p = sub.add_parser("rate", help="change the rate cap of a running campaign ('unlimited' or 0 = no cap)")
    p.add_argument("campaign", help=campaign_help)
    p.add_argument("rate", help="messages per second (above 0), or 'unlimited' (or 0) to remove the cap")
    p.set_defaults(handler=cmd_rate, uses_redis=USES_REDIS_WITHOUT_API)

    p = sub.add_parser("status", help="progress, rate and ETA of a campaign")
    p.add_argument("campaign", help=campaign_help)
    p.add_argument("--json", action="store_true", help="machine output: one JSON object (epoch seconds)")
    p.add_argument("--utc", action="store_true", help="show times in UTC (else TZ, else the local zone)")
    p.add_argument(
        "--watch",
        nargs="?",
        type=watch_interval,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if not given, at least 1) until the campaign ends or Ctrl-C",
    )
    p.set_defaults(handler=cmd_status, uses_redis=USES_REDIS_WITHOUT_API)

    p = sub.add_parser("export", help="per-message outcomes as JSONL or CSV")
    p.add_argument("campaign", help=campaign_help)
    p.add_argument(
        "--format", choices=("jsonl", "csv"), default="jsonl", help="one JSON object per line, or CSV with a header"
    )
    p.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    p.set_defaults(handler=cmd_export, uses_redis=USES_REDIS_WITHOUT_API)

    p = sub.add_parser("redis", help="the embedded Redis: start (prints URL), stop, status")
    p.add_argument(
        "action",
        choices=("start", "stop", "status"),
        help="start: start it unless it runs, print its URL (password masked); stop: shut it down cleanly; "
        "status: whether it runs (exit 1 if not). Each names the DISPATCH_HOME it uses",
    )
    p.set_defaults(handler=cmd_redis)

    p = sub.add_parser("callbacks", help="serve the provider delivery-receipt endpoints")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8098, help="port to listen on")
    p.add_argument(
        "--public-url",
        default=None,
        help="URL providers call (signatures cover it; default: DISPATCH_CALLBACK_BASE_URL, else http://HOST:PORT)",
    )
    p.set_defaults(handler=cmd_callbacks, uses_redis=USES_REDIS_ALWAYS)

    # Rooms that own their commands add them here, then installed plugins (the entry-point group
    # ``dispatch.commands``: the load-test kit registers ``demo``, ``mock-provider``, ``loadtest``
    # and ``bench`` that way, so dispatch never imports loadtest). Each is
    # ``add_commands(sub) -> None`` registering parsers whose handler is ``(args, settings) -> int``,
    # with a help text on every argument (``--help`` adds the defaults) and ``uses_redis`` set when
    # the command uses the deployment's Redis (see USES_REDIS_ALWAYS).
    import importlib
    from importlib.metadata import entry_points

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    for plugin in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda ep: ep.name):
        plugin.load()(sub)
    return parser


#: Root errors of the packages the CLI uses, by module; a module not imported raised nothing.
_ERROR_ROOTS = (
    ("channels.errors", "ChannelError"),
    ("ratelimit.errors", "RateLimitError"),
    ("monitoring.errors", "MonitoringError"),
)


def _expected(exc: Exception) -> bool:
    """An error that bad input or an unreachable server causes: a message, not a traceback."""
    if isinstance(exc, DispatchError | redis.RedisError | OSError):
        return True
    roots = [getattr(sys.modules[name], root) for name, root in _ERROR_ROOTS if name in sys.modules]
    return any(isinstance(exc, root) for root in roots)


def _describe(exc: Exception) -> str:
    """One line; library errors (Redis, files, sockets) say where they came from."""
    if isinstance(exc, redis.RedisError):
        text = f"Redis: {exc}"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename is not None else "")
    else:
        text = str(exc) or exc.__class__.__name__
    return " ".join(text.split())


def _stdout_closed() -> int:
    """The reader of stdout went away (``dispatch export ... | head``): stop quietly, as Unix
    tools do. Exit 1, not 0: the output is incomplete, and a pipeline under ``set -o pipefail``
    (or a FIFO whose reader died) must not take it for a finished export. Python's recipe:
    point stdout at /dev/null so the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (e.g. captured in a test)
        pass
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {k: v for k, v in (("api_url", args.api), ("api_token", args.token)) if v is not None}
        settings = load_settings(config_file=args.config, overrides=overrides)
        uses_redis = getattr(args, "uses_redis", None)
        local = uses_redis == USES_REDIS_ALWAYS or (uses_redis == USES_REDIS_WITHOUT_API and settings.api_url is None)
        if local and settings.redis_url is None:
            announce_embedded(resolve_redis(settings))  # the handler finds it running
        handler: Handler = args.handler
        return handler(args, settings)
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _expected(exc):
            raise
        print(f"dispatch: error: {_describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
