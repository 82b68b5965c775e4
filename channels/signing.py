"""Our webhook signature, shared by the webhook channel, receipt verification and the mock.

Headers on every signed request::

    X-Dispatch-Timestamp: <unix seconds>
    X-Dispatch-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

A receiver recomputes the HMAC over the exact bytes it received, compares with
``hmac.compare_digest``, and refuses timestamps further than its tolerance from its own clock.
The ``v1=`` prefix leaves room for rotating the scheme; several comma-separated ``v1=`` values
are accepted (a sender mid-way through a secret rotation signs with both secrets).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "sign_webhook",
    "signed_headers",
    "verify_webhook",
]

#: Header carrying the signing time in unix seconds.
TIMESTAMP_HEADER: Final = "X-Dispatch-Timestamp"
#: Header carrying ``v1=<hex digest>``.
SIGNATURE_HEADER: Final = "X-Dispatch-Signature"


def sign_webhook(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Dispatch-Signature`` value for ``body`` signed at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={digest.hexdigest()}"


def signed_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """Both headers for ``body``, signed now."""
    timestamp = int(time.time() if now is None else now)
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign_webhook(secret, timestamp, body),
    }


def verify_webhook(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """True when ``signature`` is a valid ``v1`` signature of ``body`` made within tolerance."""
    if not timestamp or not signature or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    expected = sign_webhook(secret, int(timestamp), body)
    candidates = [part.strip() for part in signature.split(",")]
    # Compare against every candidate (no early exit) so timing says nothing about which matched.
    matches = [hmac.compare_digest(expected, candidate) for candidate in candidates]
    return any(matches)
