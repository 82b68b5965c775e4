"""SMS segment counting: GSM-7 vs UCS-2, single vs concatenated, extension characters."""

from __future__ import annotations

import math

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.base import Message
from channels.segments import GSM7_BASIC, GSM7_EXTENSION, encoding, segments, septets
from channels.sms import TwilioConfig, TwilioSms


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", 1),
        ("a", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 200, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("中" * 70, 1),
        ("中" * 71, 2),
        ("中" * 134, 2),
        ("中" * 135, 3),
        ("€" * 80, 1),  # 160 septets
        ("€" * 81, 2),  # 162 septets
        ("a" * 159 + "€", 2),  # 161 septets: the extension char costs two
        ("a" * 152 + "€" + "a" * 152, 3),  # the escape pair is not split at 153
        ("😀" * 35, 1),  # 70 UTF-16 code units
        ("😀" * 36, 2),
        ("a" * 66 + "😀" + "a" * 66, 3),  # 134 units, but the pair does not straddle a part
        ("a" * 159 + "中", 3),  # one non-GSM char makes it UCS-2: 160 units, 67 per part
    ],
)
def test_segments(body: str, expected: int) -> None:
    assert segments(body) == expected


def test_encoding() -> None:
    assert encoding("Hello @£$¥ èé ÄÖÑÜ §¿ {[~]}|^€\f") == "GSM-7"
    assert encoding("Hello 中") == "UCS-2"
    assert encoding("naïve") == "UCS-2"  # ï is not in the GSM alphabet (ì is)
    assert encoding("😀") == "UCS-2"
    assert septets("a€[") == 5


def test_alphabet_sizes() -> None:
    # 128 code points minus the escape; 10 extension characters including form feed.
    assert len(GSM7_BASIC) == 127
    assert len(GSM7_EXTENSION) == 10
    assert not GSM7_BASIC & GSM7_EXTENSION


@given(st.text(alphabet=sorted(GSM7_BASIC), min_size=161, max_size=2000))
def test_plain_gsm_matches_formula(body: str) -> None:
    assert segments(body) == math.ceil(len(body) / 153)


@given(st.text(min_size=0, max_size=800))
def test_segments_within_packing_bounds(body: str) -> None:
    gsm = encoding(body) == "GSM-7"
    units = septets(body) if gsm else len(body.encode("utf-16-le")) // 2
    single, part = (160, 153) if gsm else (70, 67)
    if units <= single:
        assert segments(body) == 1
    else:
        # An unsplittable 2-unit character wastes at most one unit per part.
        assert math.ceil(units / part) <= segments(body) <= math.ceil(units / (part - 1))


async def test_cost_is_segments() -> None:
    config = TwilioConfig(base_url="http://127.0.0.1:1", account_sid="AC1", auth_token="t", from_number="+15550001")
    async with aiohttp.ClientSession() as session:
        channel = TwilioSms(session, config)
        body = "a" * 200
        message = Message(ref="r", address="+15551234567", body=body, idempotency_key="k")
        assert channel.cost(message) == 2
