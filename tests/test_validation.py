"""Address validation per channel."""

from __future__ import annotations

import pytest

from dispatch.rules.checks import Reason
from dispatch.rules.validation import AddressValidator, check_email, check_openid, check_push_token, check_webhook_url


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Ann.Lee+tag@Example.COM", "Ann.Lee+tag@example.com"),
        ("  x@a.io ", "x@a.io"),
        ("o'brien@xn--bcher-kva.de", "o'brien@xn--bcher-kva.de"),
    ],
)
def test_email_valid(raw: str, want: str) -> None:
    assert check_email(raw) == (None, want)


@pytest.mark.parametrize(
    "raw",
    ["", "plain", "@a.io", "a@", "a@localhost", "a..b@a.io", ".a@a.io", "a@-a.io", "a@a.i", "a b@a.io",
     "a@a..io", "a@a.123", "x" * 65 + "@a.io", '"q"@a.io', "a@[1.2.3.4]"],
)  # fmt: skip
def test_email_invalid(raw: str) -> None:
    assert check_email(raw) == (Reason.INVALID_EMAIL, "")


def test_push_token_shapes() -> None:
    fcm = "cX8k3Yq0RZ6:APA91bH" + "a1B2_c3-D4" * 14
    apns = "a" * 64
    assert check_push_token(fcm) == (None, fcm)
    assert check_push_token(apns) == (None, apns)
    for bad in ["short", "x" * 63, "has space" * 10, "é" * 80, "x" * 4097]:
        assert check_push_token(bad) == (Reason.INVALID_PUSH_TOKEN, "")


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("https://hooks.example.com/a?b=1", True),
        ("http://127.0.0.1:8080/x", True),
        ("ftp://example.com/", False),
        ("https://user:pw@example.com/", False),
        ("https://user@example.com/", False),
        ("https:///path", False),
        ("https://example.com:99999/", False),
        ("https://exa mple.com/", False),
        ("javascript:alert(1)", False),
        ("https://example.com/" + "a" * 2048, False),
    ],
)
def test_webhook_url(raw: str, ok: bool) -> None:
    assert (check_webhook_url(raw)[0] is None) is ok


def test_openid() -> None:
    assert check_openid("oLVPpjqs9BhvzwPj5A-vTYAX3GLc")[0] is None
    assert check_openid("short")[0] == Reason.INVALID_OPENID


def test_address_validator_dispatch() -> None:
    v = AddressValidator("DE")
    assert v.check("sms", "0151 23456789") == (None, "+4915123456789")
    assert v.check("sms", "030 1234567") == (Reason.NOT_SMS_CAPABLE, "")
    assert v.check_phone("030 1234567", sms=False) == (None, "+49301234567")
    assert v.check("sms", "12") == (Reason.INVALID_PHONE, "")
    assert v.check("sms", "  ") == (Reason.MISSING_ADDRESS, "")
    assert v.check("email", None) == (Reason.MISSING_ADDRESS, "")
    assert v.check("email", "a@B.de") == (None, "a@b.de")
    with pytest.raises(ValueError, match="unknown channel"):
        v.check("fax", "1")
