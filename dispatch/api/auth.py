"""API keys: bearer tokens stored hashed in Redis, scoped ``read`` < ``write`` < ``admin``.

A token is ``dsp_`` + 43 characters of URL-safe base64 (32 random bytes from ``secrets``). Only a
keyed BLAKE2b-256 of the token is stored (hash ``dp:apikeys``: digest -> key metadata). A slow
password hash (scrypt, argon2) protects *guessable* secrets; a 256-bit random token cannot be
guessed, so one fast hash is enough and keeps auth at one ``HGET`` per request. The optional
per-deployment ``pepper`` (the BLAKE2b key) additionally makes a stolen Redis dump useless for
checking candidate tokens offline; tokens created under one pepper only work under the same one.

Metadata never holds the token: ``{"id", "name", "scope", "created_at"}``; ``id`` (8 hex chars)
names a key for ``list`` and ``revoke``. Revocation takes effect at once, or within
``cache_s`` when the lookup caches valid keys (``dispatch serve`` caches them for
:data:`SERVE_AUTH_CACHE_S`: one Redis round trip less per request; unknown tokens are never
cached, so a new key works at once). Tokens never reach a log line: requests are logged by
:class:`PathOnlyAccessLogger` (no headers, no query string, no addresses), and problems never
echo the ``Authorization`` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast

import orjson
import redis
import redis.asyncio as aredis
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from dispatch.api.problems import ApiProblem, redacted_path

__all__ = [
    "API_KEY",
    "KEYS_HASH",
    "SCOPES",
    "SERVE_AUTH_CACHE_S",
    "ApiKey",
    "ApiKeyStore",
    "AsyncApiKeyLookup",
    "HashReader",
    "PathOnlyAccessLogger",
    "Scope",
    "auth_middleware",
    "hash_token",
]

Scope = Literal["read", "write", "admin"]
#: Scopes from weakest to strongest; a key grants its own scope and every weaker one.
SCOPES: Final[tuple[Scope, ...]] = ("read", "write", "admin")
#: Redis hash of stored keys: token digest (hex) -> metadata JSON.
KEYS_HASH: Final = "dp:apikeys"
TOKEN_PREFIX: Final = "dsp_"
#: Seconds ``dispatch serve`` trusts a looked-up key (a revocation takes at most this long).
SERVE_AUTH_CACHE_S: Final = 1.0
#: Cached keys per process at most (then the cache starts over).
_CACHE_MAX: Final = 10_000
_TOKEN_LEN: Final = len(TOKEN_PREFIX) + 43


def hash_token(token: str, pepper: bytes = b"") -> str:
    return hashlib.blake2b(token.encode("ascii"), digest_size=32, key=pepper).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scope: Scope
    created_at: float

    def allows(self, needed: Scope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)

    @classmethod
    def from_json(cls, raw: bytes) -> ApiKey:
        data: dict[str, Any] = orjson.loads(raw)
        return cls(
            id=str(data["id"]), name=str(data["name"]), scope=data["scope"], created_at=float(data["created_at"])
        )

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.id, "name": self.name, "scope": self.scope, "created_at": self.created_at})


#: The request attribute holding the authenticated key.
API_KEY: Final = web.RequestKey("api_key", ApiKey)


class ApiKeyStore:
    """Key management (sync: the ``dispatch apikey`` commands and tests)."""

    def __init__(self, client: redis.Redis, *, pepper: bytes = b"") -> None:
        self._client = client
        self._pepper = pepper

    def create(self, scope: Scope, name: str = "") -> tuple[str, ApiKey]:
        """A new key; returns ``(token, key)``. The token is shown once and never stored."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        key = ApiKey(id=secrets.token_hex(4), name=name, scope=scope, created_at=round(time.time(), 3))
        self._client.hset(KEYS_HASH, hash_token(token, self._pepper), key.to_json())
        return token, key

    def list(self) -> list[ApiKey]:
        raw = cast(dict[bytes, bytes], self._client.hgetall(KEYS_HASH))
        return sorted((ApiKey.from_json(v) for v in raw.values()), key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        raw = cast(dict[bytes, bytes], self._client.hgetall(KEYS_HASH))
        for digest, value in raw.items():
            if ApiKey.from_json(value).id == key_id:
                return bool(self._client.hdel(KEYS_HASH, digest))
        return False


class HashReader(Protocol):
    """What the lookup needs of a client: redis-py's, or ``dispatch.api.pipelined.PipelinedRedis``."""

    async def hget(self, name: str, key: str) -> Any: ...


class AsyncApiKeyLookup:
    """Token -> key for the request path (one ``HGET``, or none while a valid key is cached)."""

    def __init__(
        self,
        client: aredis.Redis | HashReader,
        *,
        pepper: bytes = b"",
        cache_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._pepper = pepper
        self._cache_s = cache_s
        self._clock = clock
        #: token digest -> (valid until, monotonic; key)
        self._cache: dict[str, tuple[float, ApiKey]] = {}

    async def lookup(self, token: str) -> ApiKey | None:
        if len(token) != _TOKEN_LEN or not token.startswith(TOKEN_PREFIX) or not token.isascii():
            return None
        digest = hash_token(token, self._pepper)
        if self._cache_s > 0:
            cached = self._cache.get(digest)
            if cached is not None and cached[0] > self._clock():
                return cached[1]
        raw = cast(bytes | None, await self._client.hget(KEYS_HASH, digest))
        if raw is None:
            return None
        # The field name *is* the digest, so Redis compared it already; compare again in constant
        # time anyway so no future change to the lookup turns this into a timing oracle.
        if not hmac.compare_digest(digest, hash_token(token, self._pepper)):
            return None
        key = ApiKey.from_json(raw)
        if self._cache_s > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (self._clock() + self._cache_s, key)
        return key


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log lines with method, path (no query string, addresses redacted: the problems'
    ``instance``, :func:`~dispatch.api.problems.redacted_path`), status and time; never a header."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.1fms", request.remote, request.method, redacted_path(request), response.status, time * 1000
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Resolves the scope a request needs; None = no authentication (health, metrics, callbacks).
ScopeFor = Callable[[web.Request], Scope | None]

_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="dispatch"'}


def auth_middleware(lookup: AsyncApiKeyLookup, scope_for: ScopeFor) -> Any:
    """Refuse before the handler runs: 401 without a valid key, 403 when its scope is too weak."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = scope_for(request)
        if needed is None:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiProblem(401, "send an API key: Authorization: Bearer <token>", headers=_CHALLENGE)
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiProblem(401, "the Authorization header is not a Bearer token", headers=_CHALLENGE)
        key = await lookup.lookup(token.strip())
        if key is None:
            raise ApiProblem(
                401, "the API key is not valid (unknown or revoked)", headers=_CHALLENGE | {"Cache-Control": "no-store"}
            )
        if not key.allows(needed):
            raise ApiProblem(403, f"this API key has scope {key.scope!r}; this operation needs {needed!r}")
        request[API_KEY] = key
        return await handler(request)

    return middleware
