"""TwilioSms against the mock provider (and a recording server) over real sockets."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from channels.base import Message, Permanent, Retryable, Sent
from channels.errors import ChannelConfigError, PermanentProviderError
from channels.sms import TwilioConfig, TwilioSms, with_ref
from loadtest.mock_provider import FaultMix, MockConfig, MockProvider
from loadtest.mock_recorder import Recorded, RecordingServer

SID = "AC" + "1" * 32
TOKEN = "secret-token"
FROM = "+15005550006"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def mock(request: pytest.FixtureRequest) -> AsyncIterator[MockProvider]:
    """The mock; ``@pytest.mark.parametrize("mock", [{...}], indirect=True)`` adds MockConfig fields."""
    config = MockConfig(
        account_sid=SID,
        auth_token=TOKEN,
        unsubscribed=frozenset({"+15550000010"}),
        not_mobile=frozenset({"+15550000020"}),
        seed=7,
        **getattr(request, "param", {}),
    )
    async with MockProvider(config) as provider:
        yield provider


SmsFactory = Callable[..., TwilioSms]


@pytest.fixture
def sms(session: aiohttp.ClientSession, mock: MockProvider) -> SmsFactory:
    def make(**overrides: object) -> TwilioSms:
        settings: dict[str, object] = {
            "base_url": mock.url,
            "account_sid": SID,
            "auth_token": TOKEN,
            "from_number": FROM,
            "honours_idempotency": True,
        }
        settings.update(overrides)
        return TwilioSms(session, TwilioConfig(**settings))  # type: ignore[arg-type]

    return make


def message(i: int = 0, *, to: str | None = None, body: str | None = None) -> Message:
    return Message(
        ref=f"c1:b1:{i}",
        address=to or f"+1555123{i:04d}",
        body=body if body is not None else f"hello {i}",
        idempotency_key=f"c1:b1:{i}",
    )


async def test_sends_a_batch_concurrently(sms: SmsFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(latency_ms=50))
    batch = [message(i) for i in range(20)]
    results = await sms().send(batch)
    assert [type(r) for r in results] == [Sent] * 20
    assert [r.ref for r in results] == [m.ref for m in batch]
    assert all(isinstance(r, Sent) and re.fullmatch(r"SM[0-9a-f]{32}", r.provider_id) for r in results)
    assert len({r.provider_id for r in results if isinstance(r, Sent)}) == 20
    assert mock.ledger.accepted == 20
    assert mock.ledger.duplicates == 0
    assert mock.ledger.max_in_flight > 1  # requests overlapped


async def test_wire_format(session: aiohttp.ClientSession) -> None:
    async def created(recorded: Recorded) -> web.StreamResponse:
        return web.json_response({"sid": "SM" + "a" * 32, "status": "queued"}, status=201)

    async with RecordingServer(created) as server:
        config = TwilioConfig(
            base_url=server.url,
            account_sid=SID,
            auth_token=TOKEN,
            messaging_service_sid="MG" + "2" * 32,
            status_callback_url="https://hooks.example.test/callbacks/twilio?tenant=7",
        )
        results = await TwilioSms(session, config).send([message(3, body="Grüße & €")])
        assert results == [Sent("c1:b1:3", "SM" + "a" * 32)]
        (request,) = server.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Authorization"] == aiohttp.encode_basic_auth(SID, TOKEN)
    assert request.headers["Idempotency-Key"] == "c1:b1:3"
    form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
    assert form["To"] == "+15551230003"
    assert form["Body"] == "Grüße & €"
    assert form["MessagingServiceSid"] == "MG" + "2" * 32
    assert "From" not in form
    callback = urlsplit(form["StatusCallback"])
    assert callback.netloc == "hooks.example.test"
    assert parse_qs(callback.query) == {"tenant": ["7"], "ref": ["c1:b1:3"]}


def test_with_ref_keeps_existing_query() -> None:
    assert with_ref("http://h/cb", "a:b") == "http://h/cb?ref=a%3Ab"
    assert with_ref("http://h/cb?x=1", "r") == "http://h/cb?x=1&ref=r"


@pytest.mark.parametrize(
    ("to", "body", "code", "suppress"),
    [
        ("12345", "hi", "21211", True),
        ("+15550000010", "hi", "21610", True),
        ("+15550000020", "hi", "21614", True),
        ("+15551234567", "", "21602", False),
        ("+15551234567", "x" * 1601, "21617", False),
    ],
)
async def test_permanent_errors(  # noqa: PLR0917 - parametrized
    sms: SmsFactory, mock: MockProvider, to: str, body: str, code: str, suppress: bool
) -> None:
    (result,) = await sms().send([message(1, to=to, body=body)])
    assert isinstance(result, Permanent)
    assert (result.code, result.suppress, result.status) == (code, suppress, 400)
    assert to not in result.reason  # reasons reach logs: no phone numbers
    assert mock.ledger.accepted == 0
    assert mock.ledger.rejected == 1


async def test_one_bad_recipient_does_not_sink_the_batch(sms: SmsFactory) -> None:
    results = await sms().send([message(0), message(1, to="nope"), message(2)])
    assert [type(r) for r in results] == [Sent, Permanent, Sent]


async def test_bad_credentials_fail_the_whole_call(sms: SmsFactory, mock: MockProvider) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sms(auth_token="wrong").send([message(0), message(1)])
    assert caught.value.status == 401
    assert caught.value.code == "20003"
    with pytest.raises(PermanentProviderError) as caught:
        await sms(account_sid="AC" + "9" * 32).send([message(0)])
    assert caught.value.status == 401  # the mock checks the credentials first
    assert mock.ledger.accepted == 0


async def test_429_carries_retry_after(sms: SmsFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(p_429=1.0, retry_after_s=2.5))
    (result,) = await sms().send([message(0)])
    assert isinstance(result, Retryable)
    assert (result.status, result.retry_after, result.ambiguous) == (429, 2.5, False)


@pytest.mark.parametrize("kind", ["p_500", "p_503"])
async def test_server_errors_are_retryable(sms: SmsFactory, mock: MockProvider, kind: str) -> None:
    mock.set_faults(FaultMix(**{kind: 1.0}))  # type: ignore[arg-type]
    (result,) = await sms().send([message(0)])
    assert isinstance(result, Retryable)
    assert result.status == int(kind[2:])
    assert mock.ledger.accepted == 0


async def test_timeout_is_retryable_and_ambiguous(sms: SmsFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(p_timeout=1.0, hang_s=5))
    (result,) = await sms(timeout_s=0.3).send([message(0)])
    assert isinstance(result, Retryable)
    assert result.ambiguous
    assert result.status is None
    assert "no answer in time" in result.reason


async def test_connection_reset_is_retryable(sms: SmsFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(p_reset=1.0))
    (result,) = await sms().send([message(0)])
    assert isinstance(result, Retryable)
    assert result.ambiguous
    assert "connection failed" in result.reason
    assert mock.ledger.faults["reset"] == 1


async def test_connection_refused_is_retryable(sms: SmsFactory) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (result,) = await sms(base_url=f"http://127.0.0.1:{port}").send([message(0)])
    assert isinstance(result, Retryable)
    assert "cannot connect" in result.reason
    assert not result.ambiguous  # the request never left: another provider may take it


async def test_html_error_page_is_handled(session: aiohttp.ClientSession) -> None:
    async def bad_gateway(recorded: Recorded) -> web.StreamResponse:
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    async with RecordingServer(bad_gateway) as server:
        config = TwilioConfig(base_url=server.url, account_sid=SID, auth_token=TOKEN, from_number=FROM)
        (result,) = await TwilioSms(session, config).send([message(0)])
    assert isinstance(result, Retryable)
    assert result.status == 502


async def test_server_side_rate_limit(sms: SmsFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(rate_limit_per_s=3))
    results = await sms().send([message(i) for i in range(20)])
    sent = sum(isinstance(r, Sent) for r in results)
    limited = [r for r in results if isinstance(r, Retryable)]
    assert 3 <= sent <= 6  # at most two one-second windows during the call
    assert len(limited) == 20 - sent
    assert all(r.status == 429 and r.retry_after == 1.0 for r in limited)


@pytest.mark.parametrize("mock", [{"honour_idempotency": True}], indirect=True)  # an idempotent proxy
async def test_idempotency_key_makes_a_resend_safe(sms: SmsFactory, mock: MockProvider) -> None:
    channel = sms(timeout_s=0.3)
    assert channel.supports_idempotency
    mock.set_faults(FaultMix(p_timeout_after_accept=1.0, hang_s=5))
    (first,) = await channel.send([message(0)])
    assert isinstance(first, Retryable) and first.ambiguous
    assert mock.ledger.accepted == 1  # the provider took it although we never heard
    mock.set_faults(FaultMix())
    (again,) = await channel.send([message(0)])
    assert isinstance(again, Sent)
    assert (mock.ledger.accepted, mock.ledger.replays, mock.ledger.duplicates) == (1, 1, 0)


async def test_resend_with_a_new_key_is_a_duplicate(sms: SmsFactory, mock: MockProvider) -> None:
    channel = sms()
    original = message(0)
    (first,) = await channel.send([original])
    resend = Message(ref=original.ref, address=original.address, body=original.body, idempotency_key="other")
    (second,) = await channel.send([resend])
    assert isinstance(first, Sent) and isinstance(second, Sent)
    assert first.provider_id != second.provider_id
    assert (mock.ledger.accepted, mock.ledger.duplicates, mock.ledger.replays) == (2, 1, 0)


def test_supports_idempotency_follows_config() -> None:
    config = TwilioConfig(base_url="http://x", account_sid=SID, auth_token=TOKEN, from_number=FROM)
    assert TwilioSms.supports_idempotency is False
    assert TwilioSms(None, config).supports_idempotency is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {"base_url": "ftp://x", "from_number": FROM},
        {"base_url": "http://x"},  # neither From nor a messaging service
        {"base_url": "http://x", "from_number": FROM, "timeout_s": 0},
    ],
)
def test_config_errors(settings: dict[str, object]) -> None:
    with pytest.raises(ChannelConfigError):
        TwilioConfig(account_sid=SID, auth_token=TOKEN, **settings)  # type: ignore[arg-type]
