"""The fast phone path gives exactly libphonenumber's answers (hypothesis + a generated corpus)."""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.rules.phones import PhoneCheck, PhoneValidator, _Dfa, _predicates_for, check_phone_naive

REGIONS = ["US", "DE", "GB", "BR", "AR", "IT", "MX", "CN", "JP", "IN", "CA", "FR", None]
CCS = ["1", "44", "49", "33", "91", "55", "52", "54", "86", "39", "81", "234", "7", "61", "800", "998"]


def _corpus(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        cc = rng.choice(CCS)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14)))
        shape = rng.random()
        if shape < 0.35:
            out.append(f"+{cc}{digits}")
        elif shape < 0.45:
            out.append(f"+{cc} ({digits[:3]}) {digits[3:6]}-{digits[6:]}")
        elif shape < 0.55:
            out.append(f"00{cc}{digits}")
        elif shape < 0.75:
            out.append("0" + digits)
        elif shape < 0.85:
            out.append(digits)
        elif shape < 0.95:
            out.append(cc + digits)
        else:
            out.append(rng.choice(["", "+", "abc", "+1 800 FLOWERS", "++44 20", "1/2", "+0049 30 1234"]))
    return out


def _realistic(rng: random.Random, n: int) -> list[str]:
    """Mostly valid numbers: libphonenumber's examples with random last digits, several formats."""
    bases = []
    for region in ["US", "DE", "GB", "FR", "IN", "BR", "MX", "CN", "JP"]:
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                bases.append(example)
    out = []
    for _ in range(n):
        base = rng.choice(bases)
        tail = len(str(base.national_number)) - 4
        national = str(base.national_number)[:tail] + f"{rng.randrange(10_000):04d}"
        number = phonenumbers.parse(f"+{base.country_code}{national}")
        fmt = rng.choice(list(phonenumbers.PhoneNumberFormat.__dict__.values()))
        out.append(phonenumbers.format_number(number, fmt) if isinstance(fmt, int) else f"+{number}")
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_generated_corpus_same_as_naive(region: str | None) -> None:
    rng = random.Random(hash(region) & 0xFFFF)
    validator = PhoneValidator(region)
    corpus = _corpus(rng, 2_500) + _realistic(rng, 2_500)
    mismatches = [s for s in corpus if validator.check(s) != check_phone_naive(s, region)]
    assert mismatches == []
    # second pass goes through the caches and must still agree
    assert [validator.check(s) for s in corpus] == [check_phone_naive(s, region) for s in corpus]


def test_realistic_numbers_are_mostly_valid_and_memoized() -> None:
    validator = PhoneValidator("US")
    corpus = _realistic(random.Random(7), 3_000)
    results = [validator.check(s) for s in corpus]
    # international formats are valid from any region; national ones of other countries are not
    assert sum(r.e164 is not None for r in results) > 900
    assert validator._memo_size < 200  # classes, not numbers


_phone_text = st.text(alphabet="0123456789 +-().", max_size=24)


@settings(max_examples=250, deadline=None)
@given(raw=_phone_text, region=st.sampled_from(REGIONS))
def test_hypothesis_same_as_naive(raw: str, region: str | None) -> None:
    assert PhoneValidator(region).check(raw) == check_phone_naive(raw, region)


@settings(max_examples=150, deadline=None)
@given(
    cc=st.sampled_from(CCS),
    national=st.text(alphabet="0123456789", min_size=2, max_size=13),
    region=st.sampled_from(REGIONS),
)
def test_hypothesis_international_same_as_naive(cc: str, national: str, region: str | None) -> None:
    validator = PhoneValidator(region)
    for raw in (f"+{cc}{national}", f"00{cc} {national}", national, f"0{national}"):
        assert validator.check(raw) == check_phone_naive(raw, region)


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=30))
def test_hypothesis_arbitrary_text_same_as_naive(raw: str) -> None:
    assert PhoneValidator("DE").check(raw) == check_phone_naive(raw, "DE")


def test_known_answers() -> None:
    validator = PhoneValidator("DE")
    assert validator.check("+49 151 23456789") == PhoneCheck("+4915123456789", True)
    assert validator.check("030 1234567") == PhoneCheck("+49301234567", False)  # fixed line
    assert validator.check("0049 151 23456789") == PhoneCheck("+4915123456789", True)
    assert validator.check("12") == PhoneCheck(None, False)
    assert validator.check("not a phone") == PhoneCheck(None, False)
    us = PhoneValidator("US")
    assert us.check("(201) 555-0123") == PhoneCheck("+12015550123", True)  # FIXED_LINE_OR_MOBILE


def test_cache_is_bounded() -> None:
    validator = PhoneValidator("US", cache_size=50)
    for i in range(500):
        validator.check(f"+1 201 555 {i:04d}")
    assert len(validator._raw_cache) <= 50
    assert len(validator._key_cache) <= 50


@pytest.mark.parametrize("cc", [1, 7, 44, 49, 55, 86, 800])
def test_automata_agree_with_re_on_metadata_patterns(cc: int) -> None:
    """The digit automata used as proofs accept exactly what ``re`` accepts."""
    preds = _predicates_for(cc)
    assert preds is not None
    rng = random.Random(cc)
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[cc]
    md = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(cc, regions[0])
    assert md is not None
    pattern = re.compile(md.general_desc.national_number_pattern)
    dfa = _Dfa(md.general_desc.national_number_pattern, prefix_match=False)
    for _ in range(3_000):
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 13)))
        state = dfa.start
        for ch in s:
            state = dfa.step(state, ord(ch) - 48)
        assert (dfa.status(state, 0) == 1) == (pattern.fullmatch(s) is not None), s


def test_prefix_match_automaton() -> None:
    dfa = _Dfa("2[0-4]|5", prefix_match=True)
    for s, want in [("21999", True), ("25", False), ("5", True), ("", False), ("52", True)]:
        state = dfa.start
        for ch in s:
            state = dfa.step(state, ord(ch) - 48)
        assert (dfa.status(state, 0) == 1) is want, s
