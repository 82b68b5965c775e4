"""A small typed client of the HTTP API (standard library only: the CLI stays light).

    client = DispatchClient("http://127.0.0.1:8080", token)
    plan = client.create_campaign({"id": "spring", "channel": "sms", "body": "Hi $first_name"},
                                  audience=Path("audience.csv"))
    client.create_campaign({"id": "nightly-1", ...}, source="crm")   # a source configured on the server
    client.start("spring")
    for record in client.messages("spring"):
        ...

Audience files are streamed from disk (multipart, with a Content-Length computed up front), never
read into memory. Every error answer raises :class:`ApiError` carrying the RFC 9457 problem; a
server that cannot be reached (or answers something that is not the API) raises
:class:`ApiUnreachable`, whose message names the URL without credentials, query or token.
"""

from __future__ import annotations

import http.client
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import orjson

from dispatch.errors import DispatchError

__all__ = ["ApiError", "ApiUnreachable", "DispatchClient", "safe_url"]

#: Bytes per read when streaming an audience file.
_CHUNK: Final = 256 * 1024


class ApiError(DispatchError):
    """The API answered with an error; ``problem`` is the problem+json body (or a stand-in)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.errors: list[dict[str, str]] = list(problem.get("errors", []))
        detail = problem.get("detail") or problem.get("title") or "error"
        fields = "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in self.errors)
        super().__init__(f"HTTP {status}: {detail}" + (f" ({fields})" if fields else ""))


class ApiUnreachable(DispatchError):
    """The API could not be reached, or what answered is not the dispatch API."""


def safe_url(url: str) -> str:
    """``url`` as it may appear in a message: scheme, host, port and path (no user, password,
    query or fragment, where a token could hide)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def _audience_type(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "application/x-ndjson"
    return "text/csv"


class DispatchClient:
    """Sync client; one instance per base URL and token (thread-safe: it holds no connection)."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | Iterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            data = orjson.dumps(body)
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        where = safe_url(self._base)
        try:
            request = urllib.request.Request(self._base + path, data=data, method=method, headers=all_headers)
        except ValueError as exc:  # no scheme, unknown scheme
            raise ApiUnreachable(f"the API URL {where} is not valid: {exc}") from None
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                problem = orjson.loads(raw)
            except orjson.JSONDecodeError:
                problem = {"title": exc.reason, "detail": raw.decode("utf-8", "replace")[:200]}
            raise ApiError(exc.code, problem if isinstance(problem, dict) else {"detail": str(problem)}) from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
            raise ApiUnreachable(f"cannot reach the API at {where}: {reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, garbled answer
            raise ApiUnreachable(f"cannot reach the API at {where}: {exc.__class__.__name__} {exc}") from None
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise ApiUnreachable(f"the server at {where} did not answer JSON: is it the dispatch API?") from None

    # campaigns

    def create_campaign(
        self,
        spec: Mapping[str, Any],
        *,
        audience: Path | None = None,
        recipients: Sequence[Mapping[str, Any]] | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Plan a campaign from an audience file (streamed), a small list of recipient rows, or
        the audience source ``source`` configured on the server (by name)."""
        if sum(given is not None for given in (audience, recipients, source)) != 1:
            raise ValueError("pass exactly one of audience=, recipients= or source=")
        if source is not None:
            planned: dict[str, Any] = self._request(
                "POST", "/v1/campaigns", body={"spec": dict(spec), "audience": {"source": source}}
            )
            return planned
        if recipients is not None:
            result: dict[str, Any] = self._request(
                "POST", "/v1/campaigns", body={"spec": dict(spec), "recipients": list(recipients)}
            )
            return result
        assert audience is not None
        boundary = "dispatch-" + secrets.token_hex(12)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\nContent-Type: application/json\r\n\r\n'
        ).encode() + orjson.dumps(dict(spec))
        head += (
            f"\r\n--{boundary}\r\n"
            f'Content-Disposition: form-data; name="audience"; filename="{quote(audience.name)}"\r\n'
            f"Content-Type: {_audience_type(audience)}\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = len(head) + audience.stat().st_size + len(tail)

        def stream() -> Iterator[bytes]:
            yield head
            with audience.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk
            yield tail

        result = self._request(
            "POST",
            "/v1/campaigns",
            data=stream(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)},
        )
        return dict(result)

    def campaign(self, campaign_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/campaigns/{quote(campaign_id)}"))

    def _act(self, campaign_id: str, action: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/campaigns/{quote(campaign_id)}/{action}"))

    def start(self, campaign_id: str) -> dict[str, Any]:
        return self._act(campaign_id, "start")

    def pause(self, campaign_id: str) -> dict[str, Any]:
        return self._act(campaign_id, "pause")

    def resume(self, campaign_id: str) -> dict[str, Any]:
        return self._act(campaign_id, "resume")

    def cancel(self, campaign_id: str) -> dict[str, Any]:
        return self._act(campaign_id, "cancel")

    def set_rate(self, campaign_id: str, rate: float | None) -> dict[str, Any]:
        return dict(self._request("PATCH", f"/v1/campaigns/{quote(campaign_id)}", body={"rate": rate}))

    def messages(self, campaign_id: str, *, batch: int | None = None, page_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every message record of a campaign (or of one batch), page after page."""
        cursor: str | None = None
        while True:
            query: dict[str, Any] = {"limit": page_size}
            if batch is not None:
                query["batch"] = batch
            if cursor is not None:
                query["cursor"] = cursor
            page = self._request("GET", f"/v1/campaigns/{quote(campaign_id)}/messages?{urlencode(query)}")
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    # triggered messages

    def send_message(
        self,
        *,
        channel: str,
        to: str,
        body: str,
        idempotency_key: str,
        subject: str | None = None,
        attributes: Mapping[str, str] | None = None,
        recipient_id: str | None = None,
        timezone: str | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"channel": channel, "to": to, "body": body}
        if subject is not None:  # required for email
            message["subject"] = subject
        if attributes:
            message["attributes"] = dict(attributes)
        if recipient_id is not None:
            message["recipient_id"] = recipient_id
        if timezone is not None:
            message["timezone"] = timezone
        return dict(self._request("POST", "/v1/messages", body=message, headers={"Idempotency-Key": idempotency_key}))

    def message(self, message_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/messages/{quote(message_id)}"))

    # suppressions

    def suppress(self, channel: str, addresses: Sequence[str]) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/suppressions", body={"channel": channel, "addresses": list(addresses)}))

    def unsuppress(self, channel: str, address: str) -> dict[str, Any]:
        path = f"/v1/suppressions/{quote(channel, safe='')}/{quote(address, safe='')}"
        return dict(self._request("DELETE", path))
