"""Command-line options of the mock's behaviour, shared by ``dispatch mock-provider`` and
``python -m loadtest.mock_provider`` (a light module: the CLI imports it before any command runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_behaviour_options", "behaviour_argv"]


def add_behaviour_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--honour-idempotency",
        action="store_true",
        help="answer a repeated Idempotency-Key with the original answer (default: ignore it, as Twilio, "
        "SendGrid and FCM do: a replay is a new message)",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        default=None,
        metavar="FILE",
        help="append every accepted message to FILE and replay it at start-up (counts survive a restart)",
    )
    parser.add_argument(
        "--lookup-messages",
        type=int,
        default=None,
        metavar="N",
        help="messages the lookup APIs remember, newest first (default 200,000; ~0.5 KB each)",
    )
    parser.add_argument(
        "--no-email-activity",
        action="store_true",
        help="do not serve SendGrid's Email Activity API (a paid add-on): GET /v3/messages answers 403",
    )


def behaviour_argv(args: argparse.Namespace) -> list[str]:
    """The options of ``add_behaviour_options`` as they were given, to pass them on."""
    argv: list[str] = []
    if args.honour_idempotency:
        argv.append("--honour-idempotency")
    if args.ledger is not None:
        argv += ["--ledger", str(args.ledger)]
    if args.lookup_messages is not None:
        argv += ["--lookup-messages", str(args.lookup_messages)]
    if args.no_email_activity:
        argv.append("--no-email-activity")
    return argv
