"""Where a deployment's Redis lives, and the checks made before using it.

``resolve_redis(settings)`` returns the application URL and the broker URL (another logical
database on the same server, because dramatiq's maintenance runs ``KEYS``), starting the embedded
server when no ``DISPATCH_REDIS_URL`` is set (``RedisTarget.started_embedded`` then says whether
this call started it, so a command can tell its user that a server now runs in the background).
``check_server`` refuses a server that could evict keys: dedup claims and snapshots silently
vanishing would double-send or lose messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from dispatch.config import Settings
from dispatch.credentials import redact_url
from dispatch.errors import EvictionPolicyError, RedisSetupError
from dispatch.store.embedded import ensure_embedded

__all__ = ["RedisTarget", "check_server", "resolve_redis", "with_db"]


@dataclass(frozen=True, kw_only=True)
class RedisTarget:
    """The deployment's Redis URLs. They may hold a password (always, for the embedded server):
    ``repr`` masks it; show a URL with :func:`dispatch.credentials.redact_url`."""

    app_url: str
    broker_url: str
    #: True when this call started the embedded server (the caller then owns stopping it, or,
    #: for a command line that leaves it running, says so: the server outlives the command).
    started_embedded: bool
    #: The embedded server's state directory (its data in ``valkey-data`` there); None when
    #: ``DISPATCH_REDIS_URL`` names the server.
    embedded_home: Path | None = None

    def __repr__(self) -> str:
        return (
            f"RedisTarget(app_url={redact_url(self.app_url)!r}, broker_url={redact_url(self.broker_url)!r}, "
            f"started_embedded={self.started_embedded!r}, embedded_home={self.embedded_home!r})"
        )


def with_db(url: str, db: int) -> str:
    """The same server URL with another logical database: the path of a ``redis://`` or
    ``rediss://`` URL, the ``db`` query option of a ``unix://`` URL (whose path is the socket);
    a ``db`` query option is dropped from the others, as redis-py would let it win over the path."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "db"]
    if parts.scheme == "unix":
        # built by hand: urlunsplit writes "unix:/path" for an empty host
        return f"unix://{parts.netloc}{parts.path}?{urlencode([*query, ('db', db)])}"
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", urlencode(query), parts.fragment))


def check_server(client: redis.Redis) -> None:
    """Refuse a server that is unreachable or would evict keys."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        # CONFIG may be disabled on managed services; fall back to INFO.
        policy = client.info("memory").get("maxmemory_policy")
    except redis.RedisError as exc:
        raise RedisSetupError(f"cannot reach Redis: {exc}") from exc
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy != "noeviction":
        raise EvictionPolicyError(
            f"Redis maxmemory-policy is {policy!r}: the server may evict dedup keys and snapshots, "
            "which would lose or double-send messages. Fix: run `CONFIG SET maxmemory-policy noeviction` "
            "and set `maxmemory-policy noeviction` in redis.conf (on a managed service, in its "
            "parameter group), then start again."
        )


def resolve_redis(settings: Settings, *, check: bool = True) -> RedisTarget:
    """Find (or start) the deployment's server and check it."""
    started = False
    home: Path | None = None
    if settings.redis_url is None:
        server, started = ensure_embedded(settings.home)
        app_url, home = server.url, server.home
    else:
        app_url = settings.redis_url
    target = RedisTarget(
        app_url=with_db(app_url, settings.app_db),
        broker_url=with_db(app_url, settings.broker_db),
        started_embedded=started,
        embedded_home=home,
    )
    if check:
        client = redis.Redis.from_url(target.app_url, socket_timeout=5.0)
        try:
            check_server(client)
        finally:
            client.close()
    return target
