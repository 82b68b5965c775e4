"""Refreshed credentials (issue 18 point 4): FCM OAuth tokens minted with google-auth from a
service-account key (a generated RSA key) at the mock's token endpoint over a socket, shared by
workers through real Redis, refreshed once on a 401."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from channels.base import Message, Sent
from channels.errors import ProviderAccountError
from channels.push import FcmConfig, FcmPush
from channels.tokens import CachedTokens, GoogleServiceAccount, MintedToken
from dispatch.config import load_settings
from dispatch.errors import ConfigError
from dispatch.send.runtime import shared_tokens
from dispatch.send.tokens import SharedTokens, token_key
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider

PROJECT = "dispatch-test"


def service_account(token_uri: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": f"dispatch@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    # the static token is not what the adapter uses: only minted tokens get through
    async with MockProvider(MockConfig(fcm_access_token="static-token-not-used", seed=5)) as provider:
        yield provider


@pytest.fixture(scope="module")
def info_template() -> dict[str, Any]:
    return service_account("http://placeholder/token")  # RSA generation once per module


def info_for(mock: MockProvider, template: dict[str, Any]) -> dict[str, Any]:
    return {**template, "token_uri": f"{mock.url}/token"}


async def mock_json(mock: MockProvider, path: str, method: str = "GET") -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, mock.url + path) as response:
        body: dict[str, Any] = await response.json()
        return body


def messages(n: int, start: int = 0) -> list[Message]:
    return [
        Message(ref=f"r{i}", address=f"device-token-{i:04d}", body="hello", idempotency_key=f"k{i}")
        for i in range(start, start + n)
    ]


async def test_google_auth_mints_an_access_token_from_the_service_account(
    mock: MockProvider, info_template: dict[str, Any]
) -> None:
    minter = GoogleServiceAccount(info_for(mock, info_template))
    minted = await minter.mint()
    assert minted.token.startswith("ya29.mock-") and minted.expires_at > 0
    assert "ya29" not in repr(minted)  # a token never reaches a log line through repr
    assert (await mock_json(mock, "/_mock/fcm/tokens"))["minted"] == 1


async def test_workers_share_one_minted_token(
    mock: MockProvider, info_template: dict[str, Any], aredis_client: aredis.Redis
) -> None:
    minter = GoogleServiceAccount(info_for(mock, info_template))
    workers = [SharedTokens(aredis_client, "fcm", minter, poll_s=0.01) for _ in range(6)]
    tokens = await asyncio.gather(*(worker.current() for worker in workers))
    assert len(set(tokens)) == 1
    assert sum(worker.mints for worker in workers) == 1
    assert (await mock_json(mock, "/_mock/fcm/tokens"))["minted"] == 1
    assert await aredis_client.ttl(token_key("fcm")) > 0  # the shared copy expires with the token


async def test_a_401_forces_one_refresh_for_the_fleet_and_each_message_is_resent_once(
    mock: MockProvider, info_template: dict[str, Any], aredis_client: aredis.Redis
) -> None:
    minter = GoogleServiceAccount(info_for(mock, info_template))
    workers = [SharedTokens(aredis_client, "fcm", minter, poll_s=0.01) for _ in range(3)]
    async with aiohttp.ClientSession() as session:
        adapters = [
            FcmPush(session, FcmConfig(base_url=mock.url, project_id=PROJECT, tokens=tokens)) for tokens in workers
        ]
        first = await asyncio.gather(*(a.send(messages(10, 10 * i)) for i, a in enumerate(adapters)))
        assert all(isinstance(r, Sent) for results in first for r in results)
        await mock_json(mock, "/_mock/fcm/revoke", "POST")  # the key was rotated: every token refused
        second = await asyncio.gather(*(a.send(messages(10, 100 + 10 * i)) for i, a in enumerate(adapters)))
        assert all(isinstance(r, Sent) for results in second for r in results)
    assert (await mock_json(mock, "/_mock/fcm/tokens"))["minted"] == 2  # one start, one forced refresh
    assert mock.ledger.accepted == 60 and mock.ledger.duplicates == 0


async def test_a_refused_service_account_is_an_account_error(
    mock: MockProvider, info_template: dict[str, Any], aredis_client: aredis.Redis
) -> None:
    mock.set_faults(FaultMix(unauthorized_s=3600))
    minter = GoogleServiceAccount(info_for(mock, info_template))
    with pytest.raises(ProviderAccountError, match="google refused the service account dispatch@") as caught:
        await SharedTokens(aredis_client, "fcm", minter).current()
    assert "BEGIN" not in str(caught.value)
    assert await aredis_client.exists(token_key("fcm") + ":lock") == 0  # the lock is released


class _Counting:
    """Mints ``t1``, ``t2``... each valid for an hour from the injected clock."""

    def __init__(self, clock: list[float]) -> None:
        self.mints = 0
        self.clock = clock

    async def mint(self) -> MintedToken:
        self.mints += 1
        return MintedToken(f"t{self.mints}", self.clock[0] + 3600)


async def test_tokens_are_renewed_before_they_expire(aredis_client: aredis.Redis) -> None:
    now = [1_000.0]
    minter = _Counting(now)
    shared = SharedTokens(aredis_client, "wechat", minter, refresh_before_s=300, clock=lambda: now[0])
    local = CachedTokens(_Counting(now), refresh_before_s=300, clock=lambda: now[0])
    assert await shared.current() == "t1" and await local.current() == "t1"
    now[0] += 3600 - 301  # still 301 s to go: kept
    assert await shared.current() == "t1" and await local.current() == "t1"
    now[0] += 2  # inside the last 300 s: renewed ahead of expiry
    assert await shared.current() == "t2" and await local.current() == "t2"
    assert await shared.refresh("t1") == "t2"  # someone already replaced the refused one
    assert minter.mints == 2


def test_worker_settings_name_the_service_account_file(tmp_path: Path) -> None:
    missing = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_PUSH_SERVICE_ACCOUNT_FILE": "nope.json"})
    with pytest.raises(ConfigError, match="DISPATCH_PUSH_SERVICE_ACCOUNT_FILE: cannot read"):
        shared_tokens(missing, aredis.Redis())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "service_account"}))
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_PUSH_SERVICE_ACCOUNT_FILE": str(bad)})
    with pytest.raises(ConfigError, match="DISPATCH_PUSH_SERVICE_ACCOUNT_FILE: service account JSON is not usable"):
        shared_tokens(settings, aredis.Redis())
    assert shared_tokens(load_settings({"DISPATCH_HOME": str(tmp_path)}), aredis.Redis()) == {}
