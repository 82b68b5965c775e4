"""Address validation per channel: phone (libphonenumber, see ``dispatch.rules.phones``), email syntax,
push token, webhook URL and WeChat openid shape. No network, no DNS. Which check a channel's
addresses get is its ``address_kind`` in the registry (``channels.registry.ChannelSpec``).

Each check returns ``(None, normalized)`` or ``(reason, "")``; the normalized address is what dedup,
suppression and frequency caps key on:

- phone: E.164 (``+4915123456789``); for the SMS channel it must also be able to receive SMS.
  A number without ``+`` is read in a region: the recipient's own (``region``/``country``
  column), else the campaign's (``CampaignSpec.region``); with neither, only international
  format (``+44 ...``) is valid;
- email: a pragmatic RFC 5322 subset: a dot-atom local part (no quoted strings, no comments,
  no IP-literal domains), at most 64 + 1 + 253 characters, a domain of at least two LDH labels
  with an alphabetic or ``xn--`` top-level label; the domain is lowercased, the local part is
  kept as given (RFC 5321 says it may be case-sensitive). Internationalized addresses
  (RFC 6531/6532, ``jörg@bücher.de``): a non-ASCII local part or domain is checked by the
  ``email-validator`` library (domains cached: IDNA is the slow part), an ASCII part by the
  rules above; all-ASCII addresses never leave the fast path (an ``str.isascii`` test). One
  normal form for both, so that dedup and the suppression hash see one mailbox once: the
  local part in Unicode NFC (RFC 6532 section 3.1), the domain as lowercased IDNA A-labels
  (``jörg@xn--bcher-kva.de``): the domain the DNS and SMTP servers see, equal whether the list
  spelt it ``bücher.de``, ``BÜCHER.de`` or ``xn--bcher-kva.de``;
- push token: FCM registration tokens (``[A-Za-z0-9_:-]``, in practice 140-200 characters) and
  APNs device tokens (64 hex digits) share this shape: 64 to 4,096 characters of that set;
- webhook URL: ``http``/``https`` with a host, no user-info (credentials do not belong in a
  recipient list), a valid port, no whitespace, at most 2,048 characters;
- openid: WeChat openids are 28 characters of ``[A-Za-z0-9_-]``; 16 to 64 are accepted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import phonenumbers

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
    "parse_region",
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
#: Region spellings accepted beside libphonenumber's codes (ISO 3166 reserves UK for GB).
_REGION_ALIASES: Final = MappingProxyType({"UK": "GB"})
#: Distinct per-recipient region values remembered (a few hundred real ones).
_MAX_REGIONS: Final = 1_024

Result = tuple[Reason | None, str]


def parse_region(value: str | None) -> str | None:
    """The ISO 3166 alpha-2 code in ``value`` (any case, surrounding spaces) that libphonenumber
    has a numbering plan for, else None (``UK`` is read as ``GB``)."""
    if not value:
        return None
    code = value.strip().upper()
    code = _REGION_ALIASES.get(code, code)
    return code if code in phonenumbers.SUPPORTED_REGIONS else None


def _ascii_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (
        len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels) and _TLD.fullmatch(labels[-1]) is not None
    )


def _smtputf8(address: str) -> Any:
    """``email-validator``'s verdict on ``address`` (None: not valid); syntax only, no DNS."""
    import email_validator  # only when a list holds such an address (it also loads dnspython)

    try:
        return email_validator.validate_email(
            address,
            allow_smtputf8=True,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            check_deliverability=False,
            globally_deliverable=False,  # the domain shape is checked as for ASCII addresses
        )
    except email_validator.EmailNotValidError:
        return None


@functools.lru_cache(maxsize=4_096)
def _idn_domain(domain: str) -> str | None:
    """The lowercased A-label form of a non-ASCII domain (IDNA 2008, UTS #46 mapping), None when
    it is not valid. Cached: a list has few domains, and IDNA is most of the cost of an address."""
    found = _smtputf8(f"x@{domain}")
    if found is None:
        return None
    ascii_domain: str = found.ascii_domain.lower()
    return ascii_domain if len(ascii_domain) <= 253 and _ascii_domain(ascii_domain) else None


def _check_international_email(value: str) -> Result:
    """A non-ASCII address (RFC 6531/6532), in the module's normal form: each part checked on
    its own, the ASCII one as in :func:`check_email`, the other by ``email-validator``."""
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        return Reason.INVALID_EMAIL, ""
    if domain.isascii():
        domain = domain.lower()
        if len(domain) > 253 or not _ascii_domain(domain):
            return Reason.INVALID_EMAIL, ""
    else:
        found_domain = _idn_domain(domain)
        if found_domain is None:
            return Reason.INVALID_EMAIL, ""
        domain = found_domain
    if local.isascii():
        if _LOCAL.fullmatch(local) is None or len(local) > 64:
            return Reason.INVALID_EMAIL, ""
    else:
        found = _smtputf8(f"{local}@example.com")
        # RFC 6531 keeps RFC 5321's 64 octets (email-validator checks them only in strict mode)
        if found is None or len(found.local_part.encode()) > 64:
            return Reason.INVALID_EMAIL, ""
        local = found.local_part
    return None, f"{local}@{domain}"


def check_email(raw: str) -> Result:
    value = raw.strip()
    if not value.isascii():
        return _check_international_email(value)
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
    _checks: dict[str, Callable[[str], Result] | None] = field(init=False, repr=False)
    #: A recipient's own region value (as written) -> the phone validator for it.
    _regions: dict[str, PhoneValidator] = field(default_factory=dict, init=False, repr=False)
    _by_code: dict[str | None, PhoneValidator] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.phones = PhoneValidator(self.default_region)
        self._by_code[self.phones.default_region] = self.phones
        by_kind: dict[AddressKind, Callable[[str], Result] | None] = {
            "sms_number": None,  # the phone check also takes the recipient's region
            "email": check_email,
            "push_token": check_push_token,
            "url": check_webhook_url,
            "openid": check_openid,
        }
        self._checks = {spec.name: by_kind[spec.address_kind] for spec in self.registry.channels()}

    def phones_for(self, region: str | None) -> PhoneValidator:
        """The phone validator for a recipient whose own region column says ``region`` (empty or
        None: the default region's). A value that is no region libphonenumber knows reads no
        national number (never the default region's: the recipient said they are elsewhere)."""
        if not region or region.isspace():
            return self.phones
        found = self._regions.get(region)
        if found is None:
            code = parse_region(region)
            found = self._by_code.get(code)
            if found is None:
                found = self._by_code[code] = PhoneValidator(code)
            if len(self._regions) < _MAX_REGIONS:  # garbage values must not grow memory
                self._regions[region] = found
        return found

    def check_phone(self, raw: str, *, sms: bool = True, region: str | None = None) -> Result:
        """``region``: the recipient's own region value (see :meth:`phones_for`)."""
        e164, sms_capable = self.phones_for(region).lookup(raw)
        if e164 is None:
            return Reason.INVALID_PHONE, ""
        if sms and not sms_capable:
            return Reason.NOT_SMS_CAPABLE, ""
        return None, e164

    def check_any(self, raw: str) -> Result:
        """An address of the global list: an email address if it holds an ``@``, else a phone
        number (any phone, SMS-capable or not)."""
        return check_email(raw) if "@" in raw else self.check_phone(raw, sms=False)

    def check(self, channel: str, raw: str | None, region: str | None = None) -> Result:
        """Validate and normalize the address for ``channel`` (``MISSING_ADDRESS`` when empty);
        ``region``: the recipient's own region value, for phone numbers."""
        if raw is None or not raw.strip():
            return Reason.MISSING_ADDRESS, ""
        if channel not in self._checks:
            raise ValueError(f"unknown channel {channel!r}")
        check = self._checks[channel]
        return self.check_phone(raw, region=region) if check is None else check(raw)
