"""HTTP plumbing shared by the adapters: one place translates aiohttp's exceptions.

Every adapter wraps its request in ``translate_errors()``: a timeout becomes ``ProviderTimeout``,
a reset or dropped connection ``ProviderConnectionError`` (the request may have arrived), a
connection that could not be made ``ProviderUnreachable`` (it never left: not in doubt). Adapters then turn
those into per-message ``Retryable`` results with ``retryable_from``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson

from channels.base import Retryable
from channels.errors import ProviderConnectionError, ProviderTimeout, ProviderUnreachable, RetryableProviderError

__all__ = ["json_or_none", "parse_retry_after", "retryable_from", "translate_errors"]


@contextmanager
def translate_errors(provider: str) -> Iterator[None]:
    """Re-raise aiohttp/asyncio transport failures as typed ``RetryableProviderError``s.

    HTTP status codes are not handled here: a response, whatever its status, is the adapter's to
    map, since each provider spells its errors differently.
    """
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # no connection in time: nothing was sent
        raise ProviderUnreachable(f"{provider}: no connection in time") from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable: nothing was sent
        raise ProviderUnreachable(f"{provider}: cannot connect ({type(exc).__name__})") from exc
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError too
        raise ProviderTimeout(f"{provider}: no answer in time") from exc
    except aiohttp.ClientConnectionError as exc:  # refused, reset, disconnected
        raise ProviderConnectionError(f"{provider}: connection failed ({type(exc).__name__})") from exc
    except aiohttp.ClientPayloadError as exc:  # the body was cut off mid-response
        raise ProviderConnectionError(f"{provider}: response cut off") from exc


def retryable_from(ref: str, exc: RetryableProviderError) -> Retryable:
    """The per-message result for a transport failure.

    A timeout or a connection lost after the request went out may have been accepted by the
    provider: ``ambiguous`` tells the caller a resend without an honoured idempotency key may
    duplicate.
    """
    ambiguous = isinstance(exc, ProviderTimeout | ProviderConnectionError) and not isinstance(exc, ProviderUnreachable)
    return Retryable(ref, str(exc), status=exc.status, retry_after=exc.retry_after, ambiguous=ambiguous)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def json_or_none(raw: bytes) -> Mapping[str, Any] | None:
    """The JSON object in ``raw``, or None when it is not a JSON object (a proxy's HTML page)."""
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None
