"""SendGridEmail against the mock's SendGrid twin (and a recording server) over real sockets."""

from __future__ import annotations

import string
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from channels.base import Message, Permanent, Retryable, Sent
from channels.email import SendGridConfig, SendGridEmail, compile_substitution
from channels.errors import ChannelConfigError, PermanentProviderError
from loadtest.mock_provider import FaultMix, MockConfig, MockProvider
from loadtest.mock_recorder import Recorded, RecordingServer

KEY = "SG.test-key"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def mock(request: pytest.FixtureRequest) -> AsyncIterator[MockProvider]:
    """The mock; ``@pytest.mark.parametrize("mock", [{...}], indirect=True)`` adds MockConfig fields."""
    async with MockProvider(MockConfig(sendgrid_api_key=KEY, seed=3, **getattr(request, "param", {}))) as provider:
        yield provider


EmailFactory = Callable[..., SendGridEmail]


@pytest.fixture
def email(session: aiohttp.ClientSession, mock: MockProvider) -> EmailFactory:
    def make(**overrides: object) -> SendGridEmail:
        settings: dict[str, object] = {
            "base_url": mock.url,
            "api_key": KEY,
            "from_email": "news@example.test",
            "default_subject": "News",
            "unsubscribe_url": "https://example.test/u?ref={ref}",
            "unsubscribe_mailto": "unsubscribe+{ref}@example.test",
        }
        settings.update(overrides)
        return SendGridEmail(session, SendGridConfig(**settings))  # type: ignore[arg-type]

    return make


def mail(i: int, *, to: str | None = None, body: str = "Hi -name-", **attributes: str) -> Message:
    return Message(
        ref=f"c9:b1:{i}",
        address=to or f"user{i}@example.test",
        body=body,
        idempotency_key=f"c9:b1:{i}",
        attributes=attributes or {"-name-": f"User {i}"},
    )


async def test_wire_format(session: aiohttp.ClientSession) -> None:
    async def accepted(recorded: Recorded) -> web.StreamResponse:
        return web.Response(status=202, headers={"X-Message-Id": "abc123"})

    async with RecordingServer(accepted) as server:
        config = SendGridConfig(
            base_url=server.url,
            api_key=KEY,
            from_email="news@example.test",
            from_name="News",
            template_id="d-123",
            unsubscribe_url="https://example.test/u?ref={ref}",
            unsubscribe_mailto="unsubscribe+{ref}@example.test",
        )
        batch = [
            mail(0),
            Message(
                ref="r1",
                address="b@example.test",
                body="x",
                idempotency_key="k",
                subject="Yours",
                attributes={"first": "B"},
            ),
        ]
        results = await SendGridEmail(session, config).send(batch)
        (request,) = server.requests
    assert results == [Sent("c9:b1:0", "abc123:c9:b1:0"), Sent("r1", "abc123:r1")]
    assert request.path == "/v3/mail/send"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    payload = orjson.loads(request.body)
    assert payload["from"] == {"email": "news@example.test", "name": "News"}
    assert payload["template_id"] == "d-123"
    assert "content" not in payload
    first, second = payload["personalizations"]
    assert first["to"] == [{"email": "user0@example.test"}]
    assert first["custom_args"] == {"ref": "c9:b1:0"}  # only the opaque ref
    assert first["dynamic_template_data"] == {"-name-": "User 0"}
    assert first["headers"] == {
        "List-Unsubscribe": "<mailto:unsubscribe+c9:b1:0@example.test>, <https://example.test/u?ref=c9:b1:0>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert "subject" not in first
    assert second["subject"] == "Yours"


async def test_substitutions_and_content_without_template(
    email: EmailFactory, mock: MockProvider, session: aiohttp.ClientSession
) -> None:
    async with RecordingServer(lambda r: _accepted()) as server:
        channel = email(base_url=server.url)
        await channel.send([mail(0), mail(1), mail(2, body="Other")])
        assert len(server.requests) == 2  # one request per distinct body
        payloads = sorted((orjson.loads(r.body) for r in server.requests), key=lambda p: len(p["personalizations"]))
    assert payloads[0]["content"] == [{"type": "text/plain", "value": "Other"}]
    assert payloads[1]["content"] == [{"type": "text/plain", "value": "Hi -name-"}]
    assert [p["substitutions"] for p in payloads[1]["personalizations"]] == [{"-name-": "User 0"}, {"-name-": "User 1"}]
    assert payloads[1]["personalizations"][0]["subject"] == "News"


async def _accepted() -> web.StreamResponse:
    return web.Response(status=202, headers={"X-Message-Id": "m"})


async def test_batch_at_the_limit_is_one_request(email: EmailFactory, mock: MockProvider) -> None:
    channel = email()
    assert channel.max_batch == 1000
    results = await channel.send([mail(i) for i in range(1000)])
    assert all(isinstance(r, Sent) for r in results)
    assert mock.ledger.accepted == 1000
    assert mock.ledger.max_in_flight == 1


async def test_over_the_limit_is_split(email: EmailFactory, mock: MockProvider) -> None:
    results = await email().send([mail(i) for i in range(1001)])
    assert sum(isinstance(r, Sent) for r in results) == 1001
    assert mock.ledger.accepted == 1001
    ids = {r.provider_id.split(":")[0] for r in results if isinstance(r, Sent)}
    assert len(ids) == 2  # two requests, two X-Message-Ids


async def test_mock_refuses_more_than_1000_personalizations(mock: MockProvider, session: aiohttp.ClientSession) -> None:
    payload = {
        "personalizations": [{"to": [{"email": f"u{i}@example.test"}]} for i in range(1001)],
        "from": {"email": "a@example.test"},
        "content": [{"type": "text/plain", "value": "x"}],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    async with session.post(f"{mock.url}/v3/mail/send", json=payload, headers=headers) as response:
        assert response.status == 400
        errors = (await response.json())["errors"]
    assert errors[0]["field"] == "personalizations"
    assert set(errors[0]) == {"message", "field", "help"}
    assert mock.ledger.accepted == 0


async def test_bad_address_is_permanent_and_the_rest_are_resent(email: EmailFactory, mock: MockProvider) -> None:
    results = await email().send([mail(0), mail(1, to="not-an-address"), mail(2)])
    assert [type(r) for r in results] == [Sent, Permanent, Sent]
    bad = results[1]
    assert isinstance(bad, Permanent)
    assert (bad.code, bad.status, bad.suppress) == ("400", 400, True)
    assert "not-an-address" not in bad.reason
    assert mock.ledger.accepted == 2
    assert mock.ledger.rejected == 1


async def test_429_uses_rate_limit_reset(email: EmailFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(p_429=1.0, retry_after_s=3))
    results = await email().send([mail(0), mail(1)])
    assert all(isinstance(r, Retryable) and r.status == 429 for r in results)
    retry_after = [r.retry_after for r in results if isinstance(r, Retryable)]
    assert all(value is not None and 2.0 <= value <= 4.0 for value in retry_after)


async def test_503_and_timeout_are_retryable(email: EmailFactory, mock: MockProvider) -> None:
    mock.set_faults(FaultMix(p_503=1.0))
    assert all(isinstance(r, Retryable) and r.status == 503 for r in await email().send([mail(0)]))
    mock.set_faults(FaultMix(p_timeout=1.0, hang_s=5))
    (result,) = await email(timeout_s=0.3).send([mail(0)])
    assert isinstance(result, Retryable) and result.ambiguous


async def test_bad_key_raises(email: EmailFactory) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await email(api_key="SG.wrong").send([mail(0)])
    assert caught.value.status == 401


async def test_bad_sender_raises(email: EmailFactory) -> None:
    with pytest.raises(PermanentProviderError, match=r"from\.email"):
        await email(from_email="nobody").send([mail(0)])


async def test_413_splits_the_request(session: aiohttp.ClientSession) -> None:
    async def small_only(recorded: Recorded) -> web.StreamResponse:
        if len(orjson.loads(recorded.body)["personalizations"]) > 2:
            return web.json_response({"errors": [{"message": "Payload Too Large", "field": None}]}, status=413)
        return await _accepted()

    async with RecordingServer(small_only) as server:
        config = SendGridConfig(
            base_url=server.url, api_key=KEY, from_email="a@example.test", unsubscribe_mailto="u@example.test"
        )
        results = await SendGridEmail(session, config).send([mail(i) for i in range(8)])
    assert all(isinstance(r, Sent) for r in results)
    assert len(server.requests) == 1 + 2 + 4  # 8 -> 4+4 -> 2+2+2+2


def test_config_requires_unsubscribe() -> None:
    with pytest.raises(ChannelConfigError, match="List-Unsubscribe"):
        SendGridConfig(base_url="http://x", api_key=KEY, from_email="a@example.test")


@pytest.mark.parametrize(
    "template",
    [
        "Hi $first_name, this is a test.",
        "Hi ${first_name}! $first_name again, $city${first_name}x",
        "No placeholders at all",
        "Unknown $nobody stays",
        "$a$b",
    ],
)
@pytest.mark.parametrize("attributes", [None, {}, {"first_name": "Ada"}, {"first_name": "Ada", "city": "-a-"}])
def test_substitution_gives_the_text_safe_substitute_gives(template: str, attributes: dict[str, str] | None) -> None:
    compiled = compile_substitution(template)
    assert compiled is not None
    text = compiled.body
    for tag, value in compiled.values(attributes).items():  # what SendGrid does with the tags
        text = text.replace(tag, value)
    expected = string.Template(template).safe_substitute(attributes) if attributes else template
    assert text == expected


@pytest.mark.parametrize("template", ["Price $$5", "A stray $ sign", "Literal -first_name- and $first_name"])
def test_substitution_refuses_what_tags_cannot_express(template: str) -> None:
    assert compile_substitution(template) is None


async def test_substituted_batch_is_one_request(email: EmailFactory, mock: MockProvider) -> None:
    channel = email()
    compiled = channel.substitution_template("Hi $name")
    assert compiled is not None
    batch = [
        Message(
            ref=f"c9:b1:{i}",
            address=f"user{i}@example.test",
            body=compiled.body,
            idempotency_key=f"k{i}",
            attributes=compiled.values({"name": f"User {i}"}),
        )
        for i in range(30)
    ]
    results = await channel.send(batch)
    assert all(isinstance(r, Sent) for r in results)
    assert len({r.provider_id.split(":")[0] for r in results if isinstance(r, Sent)}) == 1  # one request
    assert mock.ledger.accepted == 30
    assert email(template_id="d-1").substitution_template("Hi $name") is None


@pytest.mark.parametrize("mock", [{"honour_idempotency": True}], indirect=True)
async def test_mock_replays_a_resend_with_the_same_key(mock: MockProvider, session: aiohttp.ClientSession) -> None:
    """SendGrid's 202 has no body: the replay repeats the status and the X-Message-Id header."""
    payload = {
        "personalizations": [{"to": [{"email": f"u{i}@example.test"}]} for i in range(3)],
        "from": {"email": "a@example.test"},
        "content": [{"type": "text/plain", "value": "x"}],
    }
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "run-1"}
    ids = []
    for _ in range(2):
        async with session.post(f"{mock.url}/v3/mail/send", json=payload, headers=headers) as response:
            assert response.status == 202
            ids.append(response.headers["X-Message-Id"])
    assert ids[0] == ids[1]
    assert (mock.ledger.accepted, mock.ledger.replays, mock.ledger.duplicates) == (3, 1, 0)
