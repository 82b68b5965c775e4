"""Shared access tokens: one mint per deployment, every worker reading the same token.

A token (FCM's OAuth access token today, WeChat's ``access_token`` next) is kept in the hash
``dp:token:<name>`` (``token``, ``expires_at``; the key expires with the token). A worker reads it
from Redis, trusts its copy until ``refresh_before_s`` before expiry, and when it is missing,
about to expire or refused (``refresh(stale)``), takes the lock ``dp:token:<name>:lock`` (SET NX,
``lock_ttl_s``) and mints; the others wait for the new token to appear (at most ``wait_s``, then
they mint themselves: a dead lock holder must not stop the fleet). A refused token is replaced
once however many workers saw the 401: ``refresh(stale)`` returns the token already minted in
its place. The token lives in the application's Redis like any credential the workers use; it is
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import cast

import redis.asyncio as aredis

from channels.tokens import MintedToken, Minter

__all__ = ["SharedTokens", "token_key"]

log = logging.getLogger(__name__)

#: Deletes the lock only if this worker still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def token_key(name: str) -> str:
    return f"dp:token:{name}"


class SharedTokens:
    """A ``channels.tokens.TokenProvider`` whose token is shared through Redis."""

    def __init__(
        self,
        client: aredis.Redis,
        name: str,
        minter: Minter,
        *,
        refresh_before_s: float = 300.0,
        lock_ttl_s: float = 30.0,
        wait_s: float = 10.0,
        poll_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._name = name
        self._key = token_key(name)
        self._lock_key = self._key + ":lock"
        self._minter = minter
        self._refresh_before_s = refresh_before_s
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._clock = clock
        self._release = client.register_script(_RELEASE)
        self._local: MintedToken | None = None
        #: Tokens this worker minted.
        self.mints = 0

    def _fresh(self, token: MintedToken | None) -> bool:
        return token is not None and token.expires_at - self._clock() > self._refresh_before_s

    async def _read(self) -> MintedToken | None:
        raw = cast(list[bytes | None], await self._client.hmget(self._key, ["token", "expires_at"]))
        if raw[0] is None or raw[1] is None:
            return None
        return MintedToken(raw[0].decode(), float(raw[1]))

    async def current(self) -> str:
        if self._local is not None and self._fresh(self._local):
            return self._local.token
        shared = await self._read()
        if shared is not None and self._fresh(shared):
            self._local = shared
            return shared.token
        return await self._renew(None)

    async def refresh(self, stale: str) -> str:
        shared = await self._read()
        if shared is not None and shared.token != stale and self._fresh(shared):
            self._local = shared
            return shared.token
        return await self._renew(stale)

    async def _renew(self, stale: str | None) -> str:
        """Mint under the lock, or wait for whoever holds it to publish a token other than ``stale``."""
        owner = secrets.token_hex(8)
        if await self._client.set(self._lock_key, owner, nx=True, px=self._lock_ttl_ms):
            try:
                minted = await self._minter.mint()
                self.mints += 1
                ttl_ms = max(1000, int((minted.expires_at - self._clock()) * 1000))
                pipe = self._client.pipeline(transaction=True)
                pipe.hset(self._key, mapping={"token": minted.token, "expires_at": f"{minted.expires_at:.3f}"})
                pipe.pexpire(self._key, ttl_ms)
                await pipe.execute()
                log.info("token %s minted (expires in %.0f s)", self._name, minted.expires_at - self._clock())
                self._local = minted
                return minted.token
            finally:
                await self._release(keys=[self._lock_key], args=[owner])
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._wait_s
        while loop.time() < give_up:
            await asyncio.sleep(self._poll_s)
            shared = await self._read()
            if shared is not None and shared.token != stale and self._fresh(shared):
                self._local = shared
                return shared.token
        log.warning("token %s: no token from the lock holder in %.0f s; minting here", self._name, self._wait_s)
        minted = await self._minter.mint()
        self.mints += 1
        self._local = minted
        return minted.token
