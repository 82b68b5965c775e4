"""Address validation per channel: phone (libphonenumber, see ``dispatch.rules.phones``), email syntax,
push token, webhook URL and WeChat openid shape. No network, no DNS. Which check a channel's
addresses get is its ``address_kind`` in the registry (``channels.registry.ChannelSpec``).

Each check returns ``(None, normalized)`` or ``(reason, "")``; the normalized address is what dedup,
suppression and frequency caps key on:

- phone: E.164 (``+4915123456789``); for the SMS channel it must also be able to receive SMS;
- email: a pragmatic RFC 5322 subset: a dot-atom local part (no quoted strings, no comments,
  no IP-literal domains), at most 64 + 1 + 253 characters, a domain of at least two LDH labels
  with an alphabetic or ``xn--`` top-level label; the domain is lowercased, the local part is
  kept as given (RFC 5321 says it may be case-sensitive);
- push token: FCM registration tokens (``[A-Za-z0-9_:-]``, in practice 140-200 characters) and
  APNs device tokens (64 hex digits) share this shape: 64 to 4,096 characters of that set;
- webhook URL: ``http``/``https`` with a host, no user-info (credentials do not belong in a
  recipient list), a valid port, no whitespace, at most 2,048 characters;
- openid: WeChat openids are 28 characters of ``[A-Za-z0-9_-]``; 16 to 64 are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from channels import Registry, default_registry
from channels.registry import AddressKind
from dispatch.rules.checks import Reason
from dispatch.rules.phones import PhoneValidator

__all__ = [
    "ADDRESS_FIELD",
    "AddressValidator",
    "check_email",
    "check_openid",
    "check_push_token",
    "check_webhook_url",
]

#: Which recipient address each channel sends to (from the standard registry).
ADDRESS_FIELD: Final = MappingProxyType({spec.name: spec.address_field for spec in default_registry().channels()})

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL: Final = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TLD: Final = re.compile(r"[a-z]{2,63}|xn--[a-z0-9-]{1,59}")
_PUSH: Final = re.compile(r"[A-Za-z0-9_:\-]{64,4096}")
_OPENID: Final = re.compile(r"[A-Za-z0-9_\-]{16,64}")
_NO_SPACE: Final = re.compile(r"[^\x00-\x20\x7f]+")
_MAX_URL: Final = 2048

Result = tuple[Reason | None, str]


def check_email(raw: str) -> Result:
    value = raw.strip()
    local, at, domain = value.rpartition("@")
    if not at or len(value) > 318 or len(local) > 64 or len(domain) > 253:
        return Reason.INVALID_EMAIL, ""
    domain = domain.lower()
    labels = domain.split(".")
    if (
        len(labels) < 2
        or _LOCAL.fullmatch(local) is None
        or not all(_LABEL.fullmatch(label) for label in labels)
        or _TLD.fullmatch(labels[-1]) is None
    ):
        return Reason.INVALID_EMAIL, ""
    return None, f"{local}@{domain}"


def check_push_token(raw: str) -> Result:
    value = raw.strip()
    return (None, value) if _PUSH.fullmatch(value) else (Reason.INVALID_PUSH_TOKEN, "")


def check_openid(raw: str) -> Result:
    value = raw.strip()
    return (None, value) if _OPENID.fullmatch(value) else (Reason.INVALID_OPENID, "")


def check_webhook_url(raw: str) -> Result:
    value = raw.strip()
    if not value or len(value) > _MAX_URL or _NO_SPACE.fullmatch(value) is None:
        return Reason.INVALID_URL, ""
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return Reason.INVALID_URL, ""
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or not port_ok
    ):
        return Reason.INVALID_URL, ""
    return None, value


@dataclass
class AddressValidator:
    """One object the planner calls per recipient: ``check(channel, raw) -> (reason, normalized)``.

    Not thread-safe (the phone caches); build one per planning process.
    """

    default_region: str | None = "US"
    #: The channels whose addresses this validator knows (their ``address_kind`` picks the check).
    registry: Registry = field(default_factory=default_registry, repr=False)
    phones: PhoneValidator = field(init=False)
    _checks: dict[str, Callable[[str], Result]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.phones = PhoneValidator(self.default_region)
        by_kind: dict[AddressKind, Callable[[str], Result]] = {
            "sms_number": self.check_phone,
            "email": check_email,
            "push_token": check_push_token,
            "url": check_webhook_url,
            "openid": check_openid,
        }
        self._checks = {spec.name: by_kind[spec.address_kind] for spec in self.registry.channels()}

    def check_phone(self, raw: str, *, sms: bool = True) -> Result:
        result = self.phones.check(raw)
        if result.e164 is None:
            return Reason.INVALID_PHONE, ""
        if sms and not result.sms_capable:
            return Reason.NOT_SMS_CAPABLE, ""
        return None, result.e164

    def check_any(self, raw: str) -> Result:
        """An address of the global list: an email address if it holds an ``@``, else a phone
        number (any phone, SMS-capable or not)."""
        return check_email(raw) if "@" in raw else self.check_phone(raw, sms=False)

    def check(self, channel: str, raw: str | None) -> Result:
        """Validate and normalize the address for ``channel`` (``MISSING_ADDRESS`` when empty)."""
        if raw is None or not raw.strip():
            return Reason.MISSING_ADDRESS, ""
        check = self._checks.get(channel)
        if check is None:
            raise ValueError(f"unknown channel {channel!r}")
        return check(raw)
