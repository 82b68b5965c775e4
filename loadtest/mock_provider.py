"""The mock provider: one aiohttp application speaking the providers' APIs, with a ledger.

It serves the Twilio Messages API, SendGrid's mail send, FCM HTTP v1 (and Google's OAuth token
endpoint), Aliyun's SendSms and our signed webhook (``loadtest.mock_twilio``, ``mock_sendgrid``,
``mock_fcm``, ``mock_aliyun``, ``mock_webhook``), keeps
a ledger of every accepted message (duplicates, idempotent replays, per-second counts) and
injects faults from a ``FaultMix`` that can change while it runs. It serves the providers' lookup
APIs too (Twilio's Messages list and fetch, SendGrid's Email Activity API), for reconciliation.

Like the real providers, the Twilio, SendGrid and FCM twins ignore ``Idempotency-Key`` unless
``MockConfig(honour_idempotency=True)`` (``--honour-idempotency``). With
``MockConfig(ledger_path=...)`` (``--ledger FILE``) the ledger is journaled and replayed at
start-up, so duplicate counts hold across a restart (or a SIGKILL) of the mock.

In a test or a benchmark::

    async with MockProvider(MockConfig(account_sid="AC...", auth_token="...")) as mock:
        mock.url                       # "http://127.0.0.1:PORT"
        mock.ledger.accepted
        mock.set_faults(FaultMix(p_500=0.1))

From another process, the control endpoints:

- ``GET /_mock/stats``: ``{"accepted", "duplicates", "replays", "rejected", "per_second",
  "by_channel", "faults", "callbacks", "restored"}`` (``restored``: read back from the journal)
- ``POST /_mock/faults``: a ``FaultMix`` as JSON (fields omitted take their defaults)
- ``POST /_mock/reset``: empty the ledger (and its journal), the lookup stores and the
  idempotency store

Standalone: ``python -m loadtest.mock_provider --port 8080`` or ``run_mock_provider(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import orjson
import uvloop
import yarl
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from loadtest.mock_aliyun import aliyun_routes
from loadtest.mock_core import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    FaultMix,
    Ledger,
    MockConfig,
    MockState,
    ReceiptConfig,
)
from loadtest.mock_fcm import fcm_routes
from loadtest.mock_options import add_behaviour_options
from loadtest.mock_sendgrid import SendGridTwin
from loadtest.mock_twilio import twilio_routes
from loadtest.mock_webhook import webhook_routes

__all__ = [
    "FaultMix",
    "Ledger",
    "MockConfig",
    "MockProvider",
    "ReceiptConfig",
    "build_app",
    "main",
    "run_mock_provider",
]

_STATE_KEY = web.AppKey("mock_state", MockState)
_SENDGRID_KEY = web.AppKey("mock_sendgrid", SendGridTwin)


def _control_routes(state: MockState) -> list[web.RouteDef]:
    async def stats(request: web.Request) -> web.Response:
        body = state.ledger.stats()
        body["fault_mix"] = state.faults.to_dict()
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def faults(request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            mix = FaultMix.from_mapping(data)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        state.faults = mix
        return web.Response(body=orjson.dumps(mix.to_dict()), content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"reset": True})

    return [
        web.get("/_mock/stats", stats),
        web.post("/_mock/faults", faults),
        web.post("/_mock/reset", reset),
    ]


def _in_flight_middleware(state: MockState) -> Middleware:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_mock/"):
            return await handler(request)
        state.in_flight += 1
        state.ledger.max_in_flight = max(state.ledger.max_in_flight, state.in_flight)
        try:
            return await handler(request)
        finally:
            state.in_flight -= 1

    return count


def build_app(config: MockConfig) -> web.Application:
    """The mock application; its state lives under ``app[...]`` and is reachable via MockProvider."""
    state = MockState(config)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_in_flight_middleware(state)])
    sendgrid = SendGridTwin(state)
    app[_STATE_KEY] = state
    app[_SENDGRID_KEY] = sendgrid
    app.add_routes(_control_routes(state))
    app.add_routes(twilio_routes(state))
    app.add_routes(sendgrid.routes())
    app.add_routes(fcm_routes(state))
    app.add_routes(webhook_routes(state))
    app.add_routes(aliyun_routes(state))
    app.cleanup_ctx.append(_callback_session)
    return app


async def _callback_session(app: web.Application) -> AsyncIterator[None]:
    """The client the mock uses for receipt callbacks, open while the app runs."""
    state = app[_STATE_KEY]
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def send(url: str, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            # encoded=True: request exactly the URL that was signed, as Twilio does (yarl would
            # otherwise normalise escapes such as %3A and the signature would not match).
            target = yarl.URL(url, encoded=True)
            async with session.post(target, data=body, headers=dict(headers)) as response:
                await response.read()
                outcome = "sent" if response.status < 300 else "failed"
        except (aiohttp.ClientError, TimeoutError):
            outcome = "failed"
        state.ledger.callbacks[outcome] += 1

    state.callback_sender = send
    yield
    state.callback_sender = None
    await state.shutdown()
    await session.close()


class MockProvider:
    """Runs the mock on ``config.host:config.port`` (port 0: a free one) inside the current loop."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.app = build_app(self.config)
        self._state = self.app[_STATE_KEY]
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("MockProvider is not running")
        return self._url

    @property
    def sendgrid_public_key(self) -> str:
        """Verification key (base64 DER) of the signed SendGrid event webhook."""
        return self.app[_SENDGRID_KEY].public_key_b64

    @property
    def ledger(self) -> Ledger:
        return self._state.ledger

    @property
    def faults(self) -> FaultMix:
        return self._state.faults

    def set_faults(self, faults: FaultMix) -> None:
        self._state.faults = faults

    def set_receipts(self, receipts: ReceiptConfig | None) -> None:
        """Change (or stop) delivery-receipt callbacks while running."""
        self._state.receipts = receipts

    def reset(self) -> None:
        self._state.reset()

    def on_accept(self, callback: Callable[[str, str | None, str, str], None] | None) -> None:
        """Call ``callback(channel, ref, address, body)`` for each message accepted from now on."""
        self._state.on_accept = callback

    async def start(self) -> str:
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        return self._url

    async def stop(self) -> None:
        if self._runner is not None:
            self._state.closing.set()  # end hanging "timeout" faults before the runner waits
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _serve(config: MockConfig, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with MockProvider(config) as mock:
        if ready_file is not None:
            _write_ready_file(ready_file, mock.url)
        print(f"mock provider listening on {mock.url}", flush=True)
        await stop.wait()
    if ready_file is not None:
        _remove_ready_file(ready_file)


def _write_ready_file(path: Path, url: str) -> None:
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(url + "\n")
    os.replace(partial, path)  # readers never see a half-written URL


def _remove_ready_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def run_mock_provider(
    host: str = "127.0.0.1",
    port: int = 0,
    config: MockConfig | None = None,
    *,
    ready_file: Path | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. ``host``/``port`` override the config's; with port 0 the URL
    is printed (``mock provider listening on URL``) and written to ``ready_file`` if given."""
    base = config or MockConfig()
    uvloop.run(_serve(replace(base, host=host, port=port), ready_file))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.mock_provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--account-sid", default=DEFAULT_ACCOUNT_SID)
    parser.add_argument("--auth-token", default=DEFAULT_AUTH_TOKEN)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--faults", default=None, help="FaultMix as JSON")
    add_behaviour_options(parser)
    args = parser.parse_args(argv)
    faults = FaultMix.from_mapping(orjson.loads(args.faults)) if args.faults else FaultMix()
    config = MockConfig(
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        faults=faults,
        honour_idempotency=args.honour_idempotency,
        ledger_path=args.ledger,
        email_activity=not args.no_email_activity,
        **({} if args.lookup_messages is None else {"lookup_messages": args.lookup_messages}),
    )
    run_mock_provider(args.host, args.port, config, ready_file=args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
