"""Reconciliation lookups against the real mock servers over sockets, and the mock behaving like
the providers it imitates: Twilio's Messages list and the Twilio adapter's lookup, SendGrid's
Email Activity API and the SendGrid adapter's lookup, Idempotency-Key ignored unless configured,
and the mock's ledger surviving its own restart (and SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from channels import ChannelConfigError, Found, InFlight, Message, NotFound, ProviderSpec, Sent, Undecided
from channels.email import SendGridConfig, SendGridEmail
from channels.push import PROVIDER as FCM_PROVIDER
from channels.push import FcmConfig, FcmPush
from channels.sms import LOOKUP_SKEW_S, TwilioConfig, TwilioSms
from dispatch.config import Settings
from loadtest.cluster import LocalCluster
from loadtest.mock_ledger import JournalError
from loadtest.mock_options import add_behaviour_options, behaviour_argv
from loadtest.mock_provider import FaultMix, MockConfig, MockProvider
from loadtest.mock_sendgrid import parse_activity_query

REPO = Path(__file__).resolve().parent.parent
SID = "AC" + "7" * 32
TOKEN = "lookup-token"
KEY = "SG.lookup-key"
FROM = "+15005550006"
AUTH = {"Authorization": aiohttp.encode_basic_auth(SID, TOKEN)}

MockFactory = Callable[..., AbstractAsyncContextManager[MockProvider]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def mock_of() -> MockFactory:
    """``async with mock_of(**MockConfig fields) as mock``: a mock on port 0 with this file's credentials."""

    def make(**fields: Any) -> AbstractAsyncContextManager[MockProvider]:
        config = MockConfig(account_sid=SID, auth_token=TOKEN, sendgrid_api_key=KEY, seed=17, **fields)
        return MockProvider(config)

    return make


def twilio(session: aiohttp.ClientSession, mock: MockProvider, **overrides: Any) -> TwilioSms:
    fields: dict[str, Any] = {"base_url": mock.url, "account_sid": SID, "auth_token": TOKEN, "from_number": FROM}
    fields.update(overrides)
    return TwilioSms(session, TwilioConfig(**fields))


def sendgrid(
    session: aiohttp.ClientSession, mock: MockProvider, *, clock: Callable[[], float] = time.time, **overrides: Any
) -> SendGridEmail:
    fields: dict[str, Any] = {
        "base_url": mock.url,
        "api_key": KEY,
        "from_email": "news@example.com",
        "default_subject": "News",
        "unsubscribe_url": "https://example.com/u/{ref}",
        "activity_api": True,
        "activity_lag_s": 0.0,
    }
    fields.update(overrides)
    return SendGridEmail(session, SendGridConfig(**fields), clock=clock)


def message(i: int, *, to: str | None = None, body: str | None = None) -> Message:
    return Message(
        ref=f"c.1.{i}",
        address=to or f"+1555300{i:04d}",
        body=body if body is not None else f"hello {i}",
        idempotency_key=f"c.1.{i}",
    )


def in_flight(m: Message, issued_at: float) -> InFlight:
    return InFlight(
        ref=m.ref,
        address=m.address,
        body=m.body,
        subject=m.subject,
        idempotency_key=m.idempotency_key,
        issued_at=issued_at,
    )


def messages_url(mock: MockProvider) -> str:
    return f"{mock.url}/2010-04-01/Accounts/{SID}/Messages.json"


# -- Twilio: the adapter's lookup --------------------------------------------------------------


async def test_twilio_lookup_finds_what_was_sent_and_not_what_was_not(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    async with mock_of() as mock:
        channel = twilio(session, mock)
        assert channel.can_lookup
        issued = time.time()
        sent_message = message(0)
        (result,) = await channel.send([sent_message])
        assert isinstance(result, Sent)
        never_sent = message(1)
        other_body = message(2, to=sent_message.address, body="a body never sent")
        answers = await channel.lookup([in_flight(m, issued) for m in (sent_message, never_sent, other_body)])
    assert answers == [Found("c.1.0", result.provider_id), NotFound("c.1.1"), NotFound("c.1.2")]


async def test_twilio_lookup_claims_each_listed_message_for_one_request(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    """Three in-doubt requests with one body to one number, two of them at Twilio: two Found
    (each with its own sid), one NotFound."""
    async with mock_of() as mock:
        channel = twilio(session, mock)
        issued = time.time()
        same = [message(i, to="+15553009999", body="your code is ready") for i in range(3)]
        sent = await channel.send(same[:2])
        answers = await channel.lookup([in_flight(m, issued + i * 0.001) for i, m in enumerate(same)])
    found = [a for a in answers if isinstance(a, Found)]
    assert {a.provider_id for a in found} == {r.provider_id for r in sent if isinstance(r, Sent)}
    assert len(found) == 2 and sum(isinstance(a, NotFound) for a in answers) == 1


async def test_twilio_lookup_pages_back_to_the_request(mock_of: MockFactory, session: aiohttp.ClientSession) -> None:
    """Page size 2, the in-doubt message is the oldest of five to the number: page three has it."""
    async with mock_of() as mock:
        channel = twilio(session, mock, lookup_page_size=2)
        issued = time.time()
        number = "+15553001111"
        batch = [message(i, to=number, body=f"update {i}") for i in range(5)]
        first = await channel.send(batch[:1])
        await channel.send(batch[1:])
        (answer,) = await channel.lookup([in_flight(batch[0], issued)])
        async with session.get(messages_url(mock), params={"To": number, "PageSize": "2"}, headers=AUTH) as response:
            page = await response.json()
    assert isinstance(first[0], Sent) and answer == Found("c.1.0", first[0].provider_id)
    assert len(page["messages"]) == 2 and page["next_page_uri"] is not None


async def test_twilio_lookup_ignores_messages_far_from_the_request(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    """A listed message with the same body, created more than LOOKUP_SKEW_S from issued_at, is
    another send: not evidence."""
    async with mock_of() as mock:
        channel = twilio(session, mock)
        m = message(0)
        await channel.send([m])
        long_ago = time.time() - LOOKUP_SKEW_S - timedelta(hours=1).total_seconds()
        (answer,) = await channel.lookup([in_flight(m, long_ago)])
    assert answer == NotFound("c.1.0")


async def test_twilio_lookup_is_undecided_when_the_list_fails(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    number = "+15553002222"
    doubt = in_flight(message(0, to=number), time.time())
    async with mock_of() as mock:
        (unauthorised,) = await twilio(session, mock, auth_token="wrong").lookup([doubt])
        mock.set_faults(FaultMix(p_500=1.0))
        (failing,) = await twilio(session, mock).lookup([doubt])
        mock.set_faults(FaultMix(p_timeout=1.0, hang_s=5.0))
        (silent,) = await twilio(session, mock, timeout_s=0.2).lookup([doubt])
    assert isinstance(unauthorised, Undecided) and "401" in unauthorised.reason
    assert isinstance(failing, Undecided) and "500" in failing.reason
    assert isinstance(silent, Undecided) and "no answer in time" in silent.reason
    for answer in (unauthorised, failing, silent):
        assert number not in answer.reason and number[1:] not in answer.reason


# -- Twilio: the mock's list and fetch, in Twilio's wire format ---------------------------------


async def test_mock_messages_list_pages_newest_first_and_filters(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    async with mock_of(twilio_sent_after_s=0.0) as mock:
        channel = twilio(session, mock)
        number = "+15553003333"
        sent = await channel.send([message(i, to=number, body=f"n{i}") for i in range(5)])
        await channel.send([message(9, to="+15553004444")])
        sids: list[str] = []
        url: str | None = f"{messages_url(mock)}?To=%2B15553003333&PageSize=2"
        pages = 0
        while url is not None:
            async with session.get(url, headers=AUTH) as response:
                assert response.status == 200
                page = await response.json()
            pages += 1
            assert page["page_size"] == 2 and page["uri"].startswith("/2010-04-01/")
            sids += [item["sid"] for item in page["messages"]]
            url = mock.url + page["next_page_uri"] if page["next_page_uri"] else None
        item = page["messages"][-1]
        async with session.get(f"{mock.url}{item['uri']}", headers=AUTH) as response:
            fetched = await response.json()
        async with session.get(f"{messages_url(mock)[:-5]}/SM{'0' * 32}.json", headers=AUTH) as response:
            missing = (response.status, (await response.json())["code"])
        async with session.get(messages_url(mock), params={"From": "+15550000000"}, headers=AUTH) as response:
            other_sender = (await response.json())["messages"]
    assert pages == 3
    by_age = [r.provider_id for r in sent if isinstance(r, Sent)]
    assert sids == by_age[::-1]  # newest first (creation order at equal timestamps: the sequence)
    assert fetched == item
    assert {"sid", "account_sid", "to", "from", "body", "status", "date_created", "date_sent", "date_updated"} <= set(
        item
    )
    assert item["num_segments"] == "1" and item["account_sid"] == SID and item["status"] == "sent"
    assert parsedate_to_datetime(item["date_created"]).utcoffset() == timedelta(0)
    assert missing == (404, 20404)
    assert other_sender == []


async def test_mock_date_sent_filter_misses_queued_messages_as_twilio_does(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    number = "+15553005555"
    async with mock_of(twilio_sent_after_s=3600.0) as mock:
        await twilio(session, mock).send([message(0, to=number)])
        async with session.get(messages_url(mock), params={"To": number}, headers=AUTH) as response:
            (queued,) = (await response.json())["messages"]
        day = parsedate_to_datetime(queued["date_created"]).date()
        async with session.get(
            messages_url(mock), params={"To": number, "DateSent": day.isoformat()}, headers=AUTH
        ) as response:
            filtered = (await response.json())["messages"]
    assert queued["status"] == "queued" and queued["date_sent"] is None and queued["price"] is None
    assert filtered == []
    async with mock_of(twilio_sent_after_s=0.0) as mock:
        await twilio(session, mock).send([message(0, to=number)])
        answers = {}
        for name, when in (
            ("DateSent", day),
            ("DateSent>", day),
            ("DateSent<", day),
            ("DateSent<", day - timedelta(days=1)),
            ("DateSent>", day + timedelta(days=1)),
        ):
            params = {"To": number, name: when.isoformat()}
            async with session.get(messages_url(mock), params=params, headers=AUTH) as response:
                answers[(name, when)] = len((await response.json())["messages"])
        async with session.get(messages_url(mock), params={"DateSent": "yesterday"}, headers=AUTH) as response:
            bad = response.status, (await response.json())["code"]
    assert list(answers.values()) == [1, 1, 1, 0, 0]
    assert bad == (400, 20001)


async def test_mock_lookups_remember_the_newest_messages(mock_of: MockFactory, session: aiohttp.ClientSession) -> None:
    number = "+15553001212"
    async with mock_of(lookup_messages=2) as mock:
        sent = await twilio(session, mock).send([message(i, to=number, body=f"m{i}") for i in range(3)])
        await sendgrid(session, mock).send([email(0), email(1), email(2)])
        async with session.get(messages_url(mock), params={"To": number}, headers=AUTH) as response:
            listed = [item["sid"] for item in (await response.json())["messages"]]
        oldest = sent[0]
        assert isinstance(oldest, Sent)
        async with session.get(f"{messages_url(mock)[:-5]}/{oldest.provider_id}.json", headers=AUTH) as response:
            forgotten = response.status
        found = await sendgrid(session, mock).lookup([in_flight(email(i), 0.0) for i in range(3)])
    assert listed == [r.provider_id for r in sent[:0:-1] if isinstance(r, Sent)] and forgotten == 404
    assert [type(answer) for answer in found] == [NotFound, Found, Found]


# -- SendGrid: the adapter's lookup and the mock's Email Activity API ---------------------------


def email(i: int) -> Message:
    return Message(ref=f"e.1.{i}", address=f"user{i}@example.com", body="Hello", idempotency_key=f"e.1.{i}")


async def test_sendgrid_lookup_finds_by_ref_in_the_form_send_gives(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    async with mock_of() as mock:
        issued = time.time()
        channel = sendgrid(session, mock, clock=lambda: issued + 1.0)
        assert channel.can_lookup
        results = await channel.send([email(0), email(1)])
        answers = await channel.lookup([in_flight(email(i), issued) for i in range(3)])
    assert all(isinstance(r, Sent) for r in results)
    assert answers[:2] == [Found(r.ref, r.provider_id) for r in results if isinstance(r, Sent)]
    assert answers[2] == NotFound("e.1.2")  # activity_lag_s=0: an empty answer is final


async def test_sendgrid_lookup_is_undecided_while_the_feed_may_lag(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    issued = 1_000_000.0
    doubt = in_flight(email(5), issued)
    async with mock_of() as mock:
        recent = sendgrid(session, mock, clock=lambda: issued + 30.0, activity_lag_s=120.0)
        old = sendgrid(session, mock, clock=lambda: issued + 121.0, activity_lag_s=120.0)
        assert await recent.lookup([doubt]) == [Undecided("e.1.5", "activity feed may lag")]
        assert await old.lookup([doubt]) == [NotFound("e.1.5")]
    async with mock_of(email_activity_lag_s=3600.0) as lagging:  # the mock's feed lags too
        channel = sendgrid(session, lagging, activity_lag_s=120.0)
        issued_now = time.time()
        await channel.send([email(6)])
        (answer,) = await channel.lookup([in_flight(email(6), issued_now)])
    assert answer == Undecided("e.1.6", "activity feed may lag")


async def test_sendgrid_lookup_needs_the_add_on(mock_of: MockFactory, session: aiohttp.ClientSession) -> None:
    doubt = in_flight(email(0), 0.0)
    async with mock_of() as mock:
        channel = sendgrid(session, mock, activity_api=False)
        assert not channel.can_lookup
        assert await channel.lookup([doubt]) == [Undecided("e.1.0", "no lookup API")]
    async with mock_of(email_activity=False) as without:  # configured on, the account has no add-on
        (answer,) = await sendgrid(session, without).lookup([doubt])
    assert isinstance(answer, Undecided) and "403" in answer.reason and "@" not in answer.reason
    async with mock_of(faults=FaultMix(p_503=1.0)) as failing:
        (unavailable,) = await sendgrid(session, failing).lookup([doubt])
        (unauthorised,) = await sendgrid(session, failing, api_key="SG.wrong").lookup([doubt])
    assert isinstance(unavailable, Undecided) and "503" in unavailable.reason
    assert isinstance(unauthorised, Undecided) and "401" in unauthorised.reason


async def test_mock_activity_api_answers_in_sendgrid_shape(
    mock_of: MockFactory, session: aiohttp.ClientSession
) -> None:
    async with mock_of() as mock:
        await sendgrid(session, mock).send([email(0), email(1)])
        auth = {"Authorization": f"Bearer {KEY}"}
        query = 'to_email="user1@example.com" AND unique_args[\'ref\']="e.1.1"'
        async with session.get(f"{mock.url}/v3/messages", params={"limit": "5", "query": query}, headers=auth) as r:
            (item,) = (await r.json())["messages"]
        mismatch = 'to_email="user0@example.com" AND unique_args[\'ref\']="e.1.1"'
        async with session.get(f"{mock.url}/v3/messages", params={"query": mismatch}, headers=auth) as r:
            none = (await r.json())["messages"]
        async with session.get(f"{mock.url}/v3/messages", params={"query": 'nope="x"'}, headers=auth) as r:
            bad = r.status, (await r.json())["errors"][0]["field"]
        async with session.get(f"{mock.url}/v3/messages", params={"limit": "0"}, headers=auth) as r:
            bad_limit = r.status
    assert set(item) == {
        "from_email",
        "msg_id",
        "subject",
        "to_email",
        "status",
        "opens_count",
        "clicks_count",
        "last_event_time",
    }
    assert (item["to_email"], item["subject"], item["from_email"]) == ("user1@example.com", "News", "news@example.com")
    assert ".filter" in item["msg_id"] and item["last_event_time"].endswith("Z")
    assert none == [] and bad == (400, "query") and bad_limit == 400


def test_activity_query_parser() -> None:
    assert parse_activity_query('subject="Fish AND chips" and unique_args["ref"]="a\\"b"') == [
        ("subject", "Fish AND chips"),
        ("unique_args.ref", 'a"b'),
    ]
    for bad in ('to_email="a" OR to_email="b"', 'to_email="a" to_email="b"', "to_email=a"):
        with pytest.raises(ValueError):
            parse_activity_query(bad)


# -- channels without a lookup, and the registry's consistency ----------------------------------


async def test_channels_without_a_lookup_api_are_undecided(session: aiohttp.ClientSession) -> None:
    push = FcmPush(session, FcmConfig(base_url="http://127.0.0.1:9", project_id="p", access_token="t"))
    assert not push.can_lookup and not FCM_PROVIDER.lookup_api
    doubt = in_flight(message(0), 0.0)
    assert await push.lookup([doubt]) == [Undecided("c.1.0", "no lookup API")]
    with pytest.raises(ChannelConfigError, match="lookup_api"):
        ProviderSpec(adapter=FcmPush, settings_section="push", factory=FCM_PROVIDER.factory, lookup_api=True)


# -- the mock ignores Idempotency-Key like the real providers, unless told -----------------------


def _requests(mock: MockProvider) -> dict[str, tuple[str, dict[str, Any]]]:
    """One request per twin: (url, aiohttp keyword arguments), each with Idempotency-Key "k1"."""
    return {
        "sms": (
            messages_url(mock),
            {"data": {"To": "+15553006666", "From": FROM, "Body": "x"}, "headers": {**AUTH, "Idempotency-Key": "k1"}},
        ),
        "email": (
            f"{mock.url}/v3/mail/send",
            {
                "json": {
                    "personalizations": [{"to": [{"email": "a@example.com"}]}],
                    "from": {"email": "n@example.com"},
                    "content": [{"type": "text/plain", "value": "x"}],
                },
                "headers": {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "k1"},
            },
        ),
        "push": (
            f"{mock.url}/v1/projects/p/messages:send",
            {
                "json": {"message": {"token": "device-1", "notification": {"body": "x"}}},
                "headers": {"Authorization": "Bearer mock-fcm-access-token", "Idempotency-Key": "k1"},
            },
        ),
    }


@pytest.mark.parametrize("channel", ["sms", "email", "push"])
@pytest.mark.parametrize("honour", [False, True])
async def test_a_replayed_key_is_a_new_message_unless_the_mock_honours_keys(
    mock_of: MockFactory, session: aiohttp.ClientSession, channel: str, honour: bool
) -> None:
    async with mock_of(honour_idempotency=honour) as mock:
        url, kwargs = _requests(mock)[channel]
        for _ in range(2):
            async with session.post(url, **kwargs) as response:
                assert response.status < 300
        counts = (mock.ledger.accepted, mock.ledger.duplicates, mock.ledger.replays)
    assert counts == ((1, 0, 1) if honour else (2, 1, 0))


# -- the ledger survives a restart of the mock --------------------------------------------------


async def test_ledger_and_lookups_survive_a_restart(
    mock_of: MockFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    journal = tmp_path / "ledger.jsonl"
    m = message(0)
    issued = time.time()
    async with mock_of(ledger_path=journal) as mock:
        (first,) = await twilio(session, mock).send([m])
        await sendgrid(session, mock).send([email(0)])
    async with mock_of(ledger_path=journal) as mock:
        assert (mock.ledger.accepted, mock.ledger.restored, mock.ledger.duplicates) == (2, 2, 0)
        channel = twilio(session, mock)
        (found,) = await channel.lookup([in_flight(m, issued)])
        (email_found,) = await sendgrid(session, mock).lookup([in_flight(email(0), issued)])
        await channel.send([m])
        assert (mock.ledger.accepted, mock.ledger.duplicates) == (3, 1)
        async with session.post(f"{mock.url}/_mock/reset") as response:
            assert response.status == 200
    assert isinstance(first, Sent) and found == Found("c.1.0", first.provider_id)
    assert isinstance(email_found, Found)
    assert journal.read_bytes() == b""  # a reset empties the journal too


async def test_journal_skips_a_torn_last_line_and_refuses_a_broken_one(mock_of: MockFactory, tmp_path: Path) -> None:
    journal = tmp_path / "ledger.jsonl"
    line = {"ch": "push", "to": "d", "digest": "00" * 16, "key": None, "id": "n", "ts": 1.0}
    journal.write_bytes(orjson.dumps(line) + b"\n" + b'{"ch": "pu')
    async with mock_of(ledger_path=journal) as mock:
        assert mock.ledger.restored == 1
    assert journal.read_bytes() == orjson.dumps(line) + b"\n"
    async with mock_of(ledger_path=journal) as mock:  # and the next start reads it cleanly
        assert mock.ledger.restored == 1
    journal.write_bytes(b'{"ch": "pu\n' + orjson.dumps(line) + b"\n")
    with pytest.raises(JournalError, match="line 1"):
        MockProvider(MockConfig(ledger_path=journal))


def test_mock_behaviour_options_are_passed_on_as_given() -> None:
    """``dispatch mock-provider`` hands its behaviour options to ``python -m loadtest.mock_provider``."""
    parser = argparse.ArgumentParser()
    add_behaviour_options(parser)
    argv = ["--honour-idempotency", "--ledger", "ledger.jsonl", "--lookup-messages", "10", "--no-email-activity"]
    assert behaviour_argv(parser.parse_args(argv)) == argv
    assert behaviour_argv(parser.parse_args([])) == []


async def _start_mock_process(journal: Path) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.mock_provider",
        "--port",
        "0",
        "--account-sid",
        SID,
        "--auth-token",
        TOKEN,
        "--ledger",
        str(journal),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()  # "... listening on URL"
    return process, line.rsplit(" ", 1)[-1].strip()


async def test_sigkilled_mock_keeps_its_ledger(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Send, SIGKILL the mock, start it again on the same file, send the same message: one duplicate."""
    journal = tmp_path / "ledger.jsonl"
    form = {"To": "+15553007777", "From": FROM, "Body": "once only"}
    process, url = await _start_mock_process(journal)
    try:
        async with session.post(f"{url}/2010-04-01/Accounts/{SID}/Messages.json", data=form, headers=AUTH) as r:
            assert r.status == 201
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    process, url = await _start_mock_process(journal)
    try:
        async with session.post(f"{url}/2010-04-01/Accounts/{SID}/Messages.json", data=form, headers=AUTH) as r:
            assert r.status == 201
        async with session.get(f"{url}/_mock/stats") as r:
            stats = await r.json()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert (stats["accepted"], stats["restored"], stats["duplicates"]) == (2, 1, 1)


def test_a_cluster_restarts_its_mock_on_the_same_port_with_its_ledger(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    """``LocalCluster.restart_mock``: a SIGKILLed mock comes back at the same URL, its ledger read
    back from ``--ledger``, so a message accepted before and after counts as one duplicate."""
    import urllib.request
    from urllib.parse import urlencode

    journal = tmp_path / "cluster-ledger.jsonl"
    sid, token = cluster_settings.sms_account_sid, cluster_settings.sms_auth_token.reveal()
    form = urlencode({"To": "+15553008888", "From": FROM, "Body": "drill"}).encode()
    headers = {"Authorization": aiohttp.encode_basic_auth(sid, token)}

    def send(url: str) -> int:
        request = urllib.request.Request(f"{url}/2010-04-01/Accounts/{sid}/Messages.json", form, headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
            return status

    with LocalCluster(cluster_settings, workers=0, mock_args=["--ledger", str(journal)]) as cluster:
        before = cluster.mock_url
        assert send(before) == 201
        cluster.restart_mock(kill=True)
        assert cluster.mock_url == before
        assert send(cluster.mock_url) == 201
        stats = cluster.mock_stats()
    assert (stats["accepted"], stats["restored"], stats["duplicates"]) == (2, 1, 1)
