"""Access tokens that expire, for adapters whose provider wants a short-lived bearer token.

An adapter never holds such a token itself: it gets a :class:`TokenProvider` and asks it for the
current token before a batch, and for a new one (``refresh(stale)``) once when the provider
answers 401 to a token that should still be valid (revoked, rotated key). Where tokens are kept
is the caller's concern: :class:`CachedTokens` keeps one per process; the worker keeps one per
deployment in Redis behind a lock (``dispatch.send.tokens.SharedTokens``) so a fleet mints once.

Tokens are *minted* by a :class:`Minter`. :class:`GoogleServiceAccount` mints FCM's OAuth access
tokens (at most an hour) from a service-account JSON with Google's ``google-auth`` (the signed JWT
grant of RFC 7523; its ``token_uri`` is whatever the JSON says, a mock's in tests). WeChat's
``access_token`` (``POST /cgi-bin/stable_token``, 7,200 s) is one more ``Minter``.

Errors: a minter that cannot reach the token endpoint raises ``ProviderConnectionError``
(retryable); one whose credentials are refused raises ``ProviderAccountError`` (the engine then
pauses the campaign). Neither message holds the key or a token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final, Protocol, runtime_checkable

from channels.errors import ChannelConfigError, ProviderAccountError, ProviderConnectionError

__all__ = [
    "FCM_SCOPES",
    "CachedTokens",
    "GoogleServiceAccount",
    "MintedToken",
    "Minter",
    "TokenProvider",
]

#: The OAuth scope FCM HTTP v1 requires.
FCM_SCOPES: Final = ("https://www.googleapis.com/auth/firebase.messaging",)


@dataclass(frozen=True, slots=True)
class MintedToken:
    """A token and when it expires (epoch seconds)."""

    token: str
    expires_at: float

    def __repr__(self) -> str:  # a token never reaches a log line through repr
        return f"MintedToken(token='***', expires_at={self.expires_at:.0f})"


class Minter(Protocol):
    """Gets a new token from the provider's token endpoint."""

    async def mint(self) -> MintedToken: ...


@runtime_checkable
class TokenProvider(Protocol):
    """What an adapter asks for tokens."""

    async def current(self) -> str:
        """A token valid for a while yet (minting one if needed)."""
        ...

    async def refresh(self, stale: str) -> str:
        """A token other than ``stale`` (which the provider refused): the one somebody already
        minted in its place, or a new one."""
        ...


class GoogleServiceAccount:
    """Mints Google OAuth access tokens from a service account's JSON key with ``google-auth``.

    ``info`` is the parsed JSON (``type``, ``client_email``, ``private_key``, ``token_uri``...).
    google-auth's HTTP transport is synchronous: a mint runs in a thread, once an hour or so.
    """

    def __init__(self, info: Mapping[str, Any], *, scopes: tuple[str, ...] = FCM_SCOPES) -> None:
        from google.oauth2 import service_account

        try:
            self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                dict(info), scopes=scopes
            )
        except (ValueError, KeyError) as exc:
            # google-auth names the missing field; the key itself is never in the message
            raise ChannelConfigError(f"service account JSON is not usable: {type(exc).__name__}: {exc}") from None

    @property
    def account(self) -> str:
        """The service account's email (not a secret; for log lines)."""
        return str(self._credentials.service_account_email)

    def _mint(self) -> MintedToken:
        import google.auth.exceptions
        from google.auth.transport.requests import Request

        credentials = self._credentials
        try:
            credentials.refresh(Request())
        except google.auth.exceptions.TransportError as exc:
            raise ProviderConnectionError(f"google token endpoint unreachable ({type(exc).__name__})") from None
        except google.auth.exceptions.RefreshError as exc:
            if getattr(exc, "retryable", False):
                raise ProviderConnectionError("google token endpoint failed; retrying later") from None
            raise ProviderAccountError(
                f"google refused the service account {self.account} (check push_service_account_file)", status=401
            ) from None
        expiry = credentials.expiry
        expires_at = expiry.replace(tzinfo=UTC).timestamp() if expiry is not None else time.time() + 3600
        return MintedToken(str(credentials.token), expires_at)

    async def mint(self) -> MintedToken:
        return await asyncio.to_thread(self._mint)


class CachedTokens:
    """A :class:`TokenProvider` for one process: mints when the token is within
    ``refresh_before_s`` of expiring, or when refused; concurrent callers share one mint."""

    def __init__(
        self, minter: Minter, *, refresh_before_s: float = 300.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._minter = minter
        self._refresh_before_s = refresh_before_s
        self._clock = clock
        self._token: MintedToken | None = None
        self._lock = asyncio.Lock()
        #: Tokens minted by this provider (for tests and metrics).
        self.mints = 0

    def _fresh(self, token: MintedToken | None) -> bool:
        return token is not None and token.expires_at - self._clock() > self._refresh_before_s

    async def current(self) -> str:
        if self._token is not None and self._fresh(self._token):
            return self._token.token
        async with self._lock:
            if self._token is None or not self._fresh(self._token):
                self._token = await self._minter.mint()
                self.mints += 1
            return self._token.token

    async def refresh(self, stale: str) -> str:
        async with self._lock:
            if self._token is None or self._token.token == stale:
                self._token = await self._minter.mint()
                self.mints += 1
            return self._token.token
