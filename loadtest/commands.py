"""Subcommands of the load-test kit: ``dispatch demo``, ``dispatch mock-provider``,
``dispatch loadtest`` and ``dispatch bench``.

Registered as a plugin of the ``dispatch`` command line (entry-point group ``dispatch.commands``
in pyproject.toml): ``dispatch.cli`` never imports ``loadtest``. The heavy modules are imported
only when a command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from channels import default_registry
from dispatch.config import Settings
from loadtest.mock_options import add_behaviour_options, behaviour_argv

__all__ = ["add_commands", "cmd_bench", "cmd_chaos", "cmd_demo", "cmd_loadtest", "cmd_mock_provider"]


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.demo import run_demo

    return run_demo(settings, recipients=args.recipients, workers=args.workers, as_json=args.json)


def cmd_mock_provider(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.mock_provider import main as mock_main

    argv = ["--host", args.host, "--port", str(args.port)]
    argv += ["--account-sid", settings.sms_account_sid, "--auth-token", settings.sms_auth_token.reveal()]
    if args.faults:
        argv += ["--faults", args.faults]
    return mock_main(argv + behaviour_argv(args))


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.report import format_report
    from loadtest.runner import CHANNELS, LoadtestOptions, run_loadtest

    assert args.channel in CHANNELS
    report = run_loadtest(
        settings,
        LoadtestOptions(
            recipients=args.recipients,
            workers=args.workers or settings.workers,
            channel=args.channel,
            provider_latency_ms=args.provider_latency,
            error_rate=args.error_rate,
            rate_limit=args.rate_limit or None,
            out_dir=args.out,
            seed=args.seed,
            batch_size=args.batch_size,
            profile_s=args.profile,
            progress=not args.json,
        ),
    )
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.bench import run_bench

    if args.matrix:
        from loadtest.bench_predict import parse_cases, run_matrix
        from loadtest.runner import LoadtestError

        if args.busy < 0 or args.warmup < 0:
            raise LoadtestError("--busy and --warmup must be 0 or more")
        return run_matrix(
            replace(settings, workers=args.workers or settings.workers),
            cases=parse_cases(args.cases),
            busy=args.busy,
            warmup=args.warmup,
            as_json=args.json,
        )

    return run_bench(
        settings,
        messages=args.messages,
        workers=args.workers or settings.workers,
        raw_seconds=args.raw_seconds,
        planner_rows=args.planner_rows,
        naive_rows=args.naive_rows,
        out_dir=args.out,
        as_json=args.json,
        prediction=args.prediction,
        derive_rows=args.derive_rows,
    )


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.chaos import ChaosOptions, run_chaos

    options = ChaosOptions(
        recipients=args.recipients,
        workers=args.workers,
        rate=args.rate,
        worker_kills=args.worker_kills,
        valkey_kill=not args.no_valkey_kill,
        cut_aof=not args.no_aof_cut,
        outage_s=args.outage,
    )
    report = run_chaos(settings, options, say=(lambda _: None) if args.json else print)
    if args.json:
        print(orjson.dumps(report.as_dict()).decode())
    else:
        print(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
        print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    """Register ``demo``, ``mock-provider``, ``loadtest`` and ``bench`` on the ``dispatch`` parser's
    subparsers."""
    p = sub.add_parser("demo", help="run a complete demo campaign on embedded defaults")
    p.add_argument(
        "--recipients", type=int, default=20_000, help="audience rows to generate (some invalid, some duplicated)"
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: DISPATCH_WORKERS)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("mock-provider", help="serve the mock providers (Twilio, SendGrid, FCM, webhook)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--port", type=int, default=8099, help="port to listen on (the provider base URLs' default; 0: any free one)"
    )
    p.add_argument(
        "--faults",
        default=None,
        help='fault mix as JSON, e.g. {"p_500": 0.1, "latency_ms": 20} (default: none, every send succeeds)',
    )
    add_behaviour_options(p)
    p.set_defaults(handler=cmd_mock_provider)

    p = sub.add_parser("loadtest", help="send a synthetic campaign through real workers against the mock provider")
    p.add_argument("--recipients", type=int, required=True, help="audience rows to generate")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the workers setting)")
    p.add_argument(
        "--channel", choices=default_registry().channel_names(sendable=True), default="sms", help="channel to send on"
    )
    p.add_argument("--provider-latency", type=float, default=0.0, metavar="MS", help="mock latency per request")
    p.add_argument("--error-rate", type=float, default=0.0, metavar="P", help="share of requests answered 500/503")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="R", help="account limit per second (0 = none)")
    p.add_argument("--batch-size", type=int, default=None, help="recipients per batch (default: the setting)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated audience (same seed, same rows)")
    p.add_argument(
        "--profile", type=float, default=0.0, metavar="S", help="py-spy the workers and the mock for S seconds"
    )
    p.add_argument("--out", type=Path, default=None, help="directory of the JSON report and PNG chart")
    p.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    p.set_defaults(handler=cmd_loadtest)

    p = sub.add_parser(
        "chaos",
        help="crash drill: send a campaign while workers and Valkey are SIGKILLed and the provider is down, "
        "then compare every recipient with the provider's ledger (run in a DISPATCH_HOME of its own)",
    )
    p.add_argument("--recipients", type=int, default=20_000, help="audience rows to generate")
    p.add_argument("--workers", type=int, default=3, help="worker processes")
    p.add_argument("--rate", type=float, default=500.0, help="campaign cap, messages per second")
    p.add_argument("--worker-kills", type=int, default=2, help="worker SIGKILLs (each restarted 2 s later)")
    p.add_argument("--no-valkey-kill", action="store_true", help="do not SIGKILL the Valkey server")
    p.add_argument("--no-aof-cut", action="store_true", help="keep the AOF whole when Valkey is killed")
    p.add_argument("--outage", type=float, default=20.0, metavar="S", help="provider outage in seconds (0: none)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(handler=cmd_chaos)

    p = sub.add_parser("bench", help="raw provider ceiling vs the full pipeline, and the planner benchmark")
    p.add_argument("--messages", type=int, default=200_000, help="messages the pipeline sends")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the workers setting)")
    p.add_argument("--raw-seconds", type=float, default=10.0, help="duration of the bare-client measurement")
    p.add_argument("--planner-rows", type=int, default=200_000, help="rows for the planner benchmark (0 = skip)")
    p.add_argument("--naive-rows", type=int, default=50_000, help="rows for the planner's naive baseline")
    p.add_argument("--out", type=Path, default=None, help="directory of the pipeline run's report and chart")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--prediction", action="store_true", help="also run the predicted-vs-actual matrix")
    p.add_argument(
        "--derive-rows", type=int, default=0, help="rows for the derived-audience benchmark (0: skip; bench_derive)"
    )
    p.add_argument(
        "--matrix",
        action="store_true",
        help="only the prediction matrix of issue 21: point, range, actual, error, live ETA at 10%% per case",
    )
    p.add_argument("--cases", default=None, help="with --matrix: comma-separated cases (default: all)")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="with --matrix: run beside N busy loops")
    p.add_argument(
        "--warmup", type=int, default=50_000, metavar="N", help="with --matrix: first send N per channel (0 = none)"
    )
    p.set_defaults(handler=cmd_bench)
