"""RFC 9457 problem details for the HTTP API: one exception type, one middleware.

Handlers raise :class:`ApiProblem`; :func:`problem_middleware` turns it, aiohttp's own HTTP errors
(unknown route, wrong method, body over ``client_max_size``) and unexpected exceptions into an
``application/problem+json`` response with ``type``, ``title``, ``status``, ``detail``,
``instance`` and, for validation failures, ``errors: [{field, reason}]``. A problem never echoes a
request header, a token or an address back: ``instance`` is :func:`redacted_path`, the form the
access log prints too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import orjson
from aiohttp import web

from dispatch.errors import DispatchError

__all__ = [
    "ADDRESS_PARAMS",
    "PROBLEM_BASE",
    "PROBLEM_JSON",
    "ApiProblem",
    "FieldError",
    "problem_middleware",
    "problem_response",
    "redacted_path",
]

log = logging.getLogger("dispatch.api.app")

#: Media type of every error response.
PROBLEM_JSON: Final = "application/problem+json"
#: ``type`` URIs are this base plus a short slug (documented in the OpenAPI description).
PROBLEM_BASE: Final = "https://dispatch.invalid/problems/"

#: Route parameters that hold a recipient's address (phone number, email, push token, openid),
#: or a tracked link's token (``/r/{token}``: whoever reads it can click as the recipient).
ADDRESS_PARAMS: Final = frozenset({"address", "token"})
#: Shown instead of a path segment that holds an address.
REDACTED: Final = "{redacted}"
#: Characters of a phone number as written in a path (digits and the usual separators).
_PHONE_CHARS: Final = frozenset("0123456789+ ().-")

_TITLES: Final = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal server error",
    503: "Service unavailable",
}
_SLUGS: Final = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "validation",
    500: "internal",
    503: "unavailable",
}


def _looks_like_address(segment: str) -> bool:
    """An email, or a phone number: 7+ digits and nothing but phone characters (E.164 or national)."""
    if "@" in segment:
        return True
    return sum(c.isdigit() for c in segment) >= 7 and all(c in _PHONE_CHARS for c in segment)


def redacted_path(request: web.BaseRequest) -> str:
    """The request's path as logs and problems show it: no query string, and ``{redacted}`` for
    every segment that holds an address: the route's :data:`ADDRESS_PARAMS` segments whatever
    they hold (push tokens look like nothing in particular), and any segment that looks like an
    email or a phone number (a mistyped or unmatched path may carry one too)."""
    segments = request.raw_path.split("?", 1)[0].split("/")
    names: list[str | None] = [None] * len(segments)
    match_info = getattr(request, "match_info", None)  # absent on a request aiohttp could not parse
    resource = match_info.route.resource if match_info is not None else None
    if resource is not None:
        template = resource.canonical.split("/")
        if len(template) == len(segments):
            names = [part[1:-1] if part.startswith("{") and part.endswith("}") else None for part in template]
    shown: list[str] = []
    for segment, name in zip(segments, names, strict=True):
        text = unquote(segment)
        shown.append(REDACTED if name in ADDRESS_PARAMS or _looks_like_address(text) else text)
    return "/".join(shown)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field: a dotted path (``recipients[3].phone``) and why."""

    field: str
    reason: str


class ApiProblem(DispatchError):
    """An HTTP error answered as problem+json (``status`` and a human ``detail``)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or _SLUGS.get(status, "error")
        self.errors = list(errors)
        self.headers = headers or {}


def problem_response(
    status: int,
    detail: str,
    *,
    instance: str,
    slug: str | None = None,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (slug or _SLUGS.get(status, "error")),
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if errors:
        body["errors"] = [{"field": e.field, "reason": e.reason} for e in errors]
    return web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_JSON, headers=headers or None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    instance = redacted_path(request)
    try:
        return await handler(request)
    except ApiProblem as exc:
        return problem_response(
            exc.status, exc.detail, instance=instance, slug=exc.slug, errors=exc.errors, headers=exc.headers
        )
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size
        return problem_response(413, f"request body over {limit} bytes", instance=instance)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        detail = exc.reason if exc.status != 404 else f"no resource at {instance}"
        return problem_response(exc.status, detail, instance=instance, headers=headers)
    except Exception:
        # The traceback names code, never the request's headers or body.
        log.exception("unhandled error in %s %s", request.method, request.match_info.route.resource)
        return problem_response(500, "the server failed to handle this request", instance=instance)
