"""The mock provider itself: Twilio's shapes, the ledger, control endpoints, the standalone runner."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.mock_provider import FaultMix, MockConfig, MockProvider

REPO = Path(__file__).resolve().parent.parent
SID = "AC" + "3" * 32
TOKEN = "tok"
AUTH = {"Authorization": aiohttp.encode_basic_auth(SID, TOKEN)}


@pytest.fixture
async def mock(request: pytest.FixtureRequest) -> AsyncIterator[MockProvider]:
    """The mock; ``@pytest.mark.parametrize("mock", [{...}], indirect=True)`` adds MockConfig fields."""
    extra = getattr(request, "param", {})
    async with MockProvider(MockConfig(account_sid=SID, auth_token=TOKEN, **extra)) as provider:
        yield provider


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def messages_url(mock: MockProvider, sid: str = SID) -> str:
    return f"{mock.url}/2010-04-01/Accounts/{sid}/Messages.json"


async def test_twilio_resource_shape(mock: MockProvider, http: aiohttp.ClientSession) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "a" * 200}
    async with http.post(messages_url(mock), data=form, headers=AUTH) as response:
        assert response.status == 201
        resource = await response.json()
    assert re.fullmatch(r"SM[0-9a-f]{32}", resource["sid"])
    assert resource["status"] == "queued"
    assert (resource["to"], resource["from"], resource["body"]) == (form["To"], form["From"], form["Body"])
    assert resource["num_segments"] == "2"
    assert resource["account_sid"] == SID
    assert resource["uri"] == f"/2010-04-01/Accounts/{SID}/Messages/{resource['sid']}.json"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, 20003),
        ({"Authorization": aiohttp.encode_basic_auth(SID, "wrong")}, 401, 20003),
        ({"Authorization": "Bearer " + TOKEN}, 401, 20003),
    ],
)
async def test_twilio_auth_errors(
    mock: MockProvider, http: aiohttp.ClientSession, headers: dict[str, str], status: int, code: int
) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
    async with http.post(messages_url(mock), data=form, headers=headers) as response:
        assert response.status == status
        error = await response.json()
    assert error == {
        "code": code,
        "message": "Authenticate",
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": "+15005550006", "Body": "x"}, 21604),
        ({"To": "+15551234567", "From": "+15005550006"}, 21602),
        ({"To": "+15551234567", "Body": "x"}, 21603),
        ({"To": "555-1234", "From": "+15005550006", "Body": "x"}, 21211),
    ],
)
async def test_twilio_validation(
    mock: MockProvider, http: aiohttp.ClientSession, form: dict[str, str], code: int
) -> None:
    async with http.post(messages_url(mock), data=form, headers=AUTH) as response:
        assert response.status == 400
        error = await response.json()
    assert (error["code"], error["status"]) == (code, 400)
    assert mock.ledger.rejected == 1
    assert mock.ledger.accepted == 0


async def test_wrong_account_in_path_is_404(mock: MockProvider, http: aiohttp.ClientSession) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
    async with http.post(messages_url(mock, "AC" + "4" * 32), data=form, headers=AUTH) as response:
        assert response.status == 404
        assert (await response.json())["code"] == 20404


async def test_control_endpoints(mock: MockProvider, http: aiohttp.ClientSession) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "same"}
    for _ in range(3):
        async with http.post(messages_url(mock), data=form, headers=AUTH) as response:
            assert response.status == 201
    async with http.get(f"{mock.url}/_mock/stats") as response:
        stats = await response.json()
    assert (stats["accepted"], stats["duplicates"], stats["replays"], stats["rejected"]) == (3, 2, 0, 0)
    assert stats["by_channel"] == {"sms": 3}
    assert sum(stats["per_second"].values()) == 3
    assert all(abs(int(second) - time.time()) < 60 for second in stats["per_second"])

    async with http.post(f"{mock.url}/_mock/faults", json={"p_503": 1.0}) as response:
        assert response.status == 200
    assert mock.faults == FaultMix(p_503=1.0)
    async with http.post(messages_url(mock), data=form, headers=AUTH) as response:
        assert response.status == 503
        assert (await response.json())["code"] == 20503

    async with http.post(f"{mock.url}/_mock/faults", json={"p_bogus": 1}) as response:
        assert response.status == 400
    async with http.post(f"{mock.url}/_mock/faults", json={"p_500": 2.0}) as response:
        assert response.status == 400
    assert mock.faults == FaultMix(p_503=1.0)  # a bad mix changes nothing

    async with http.post(f"{mock.url}/_mock/reset") as response:
        assert response.status == 200
    assert (mock.ledger.accepted, mock.ledger.duplicates) == (0, 0)


@pytest.mark.parametrize("mock", [{"honour_idempotency": True}], indirect=True)
async def test_idempotent_replay_returns_the_original(mock: MockProvider, http: aiohttp.ClientSession) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
    headers = {**AUTH, "Idempotency-Key": "k1"}
    sids = []
    for _ in range(3):
        async with http.post(messages_url(mock), data=form, headers=headers) as response:
            assert response.status == 201
            sids.append((await response.json())["sid"])
    assert len(set(sids)) == 1
    assert (mock.ledger.accepted, mock.ledger.replays, mock.ledger.duplicates) == (1, 2, 0)


def test_fault_mix_validation() -> None:
    with pytest.raises(ValueError, match="p_429"):
        FaultMix(p_429=-0.1)
    with pytest.raises(ValueError, match="<= 1"):
        FaultMix(p_500=0.6, p_503=0.6)
    with pytest.raises(ValueError, match="jitter"):
        FaultMix(jitter="gaussian")  # type: ignore[arg-type]
    assert FaultMix.from_mapping({"latency_ms": 5}).latency_ms == 5


async def test_latency_jitter_is_applied(http: aiohttp.ClientSession) -> None:
    faults = FaultMix(latency_ms=30, jitter="lognormal", jitter_ms=5, jitter_sigma=0.5)
    async with MockProvider(MockConfig(account_sid=SID, auth_token=TOKEN, faults=faults, seed=1)) as mock:
        form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
        started = time.perf_counter()
        async with http.post(messages_url(mock), data=form, headers=AUTH) as response:
            assert response.status == 201
        assert time.perf_counter() - started >= 0.03


async def test_standalone_runner(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ready = tmp_path / "mock.url"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.mock_provider",
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--account-sid",
        SID,
        "--auth-token",
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert ready.read_text().strip() == url
        form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
        async with http.post(f"{url}/2010-04-01/Accounts/{SID}/Messages.json", data=form, headers=AUTH) as response:
            assert response.status == 201
        async with http.get(f"{url}/_mock/stats") as response:
            assert (await response.json())["accepted"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert not ready.exists()
