"""Phone numbers: E.164 normalization, validity and SMS capability, fast and exact.

The reference answer is :func:`check_phone_naive`: ``phonenumbers.parse`` + ``is_valid_number`` +
``number_type`` per string (about 45,000/s per core). :class:`PhoneValidator` gives the *same*
answer for every input, faster, in three layers:

1. an exact-match cache keyed on the raw string;
2. a cheap pre-normalization for the common shape (ASCII digits, an optional leading ``+`` and
   the separators `` ().-``): for that shape libphonenumber's answer depends only on
   ``(has_plus, digits)``, so a second cache is keyed on that, and the parse steps that matter
   (IDD/``+`` country-code extraction, national-prefix stripping) are replayed with
   libphonenumber's own helper functions; anything else falls back to the naive path;
3. a memo of the classification keyed on ``(country code, national length, first k digits)``,
   used only where the metadata *proves* the answer is fixed by that prefix and length: every
   regular expression libphonenumber consults for the calling code (each region's general,
   fixed-line, mobile, ... patterns and ``leading_digits``) is compiled into a digit automaton,
   and the memo key is only created once each of them is either true for *every* continuation of
   the prefix to that length or false for every one. The answer is then computed once by
   libphonenumber itself on a real member of the class. Patterns the automaton builder does not
   understand make the calling code fall back to libphonenumber for every number.

SMS capability: a valid number whose type is ``MOBILE`` or ``FIXED_LINE_OR_MOBILE``. The second
is needed because several numbering plans (NANPA: US, CA, ...; CN, ...) cannot tell mobile from
fixed-line numbers by their digits; rejecting them would reject every US recipient. ``VOIP``,
``PAGER`` and the rest are refused: most SMS providers refuse or silently drop them.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType
from phonenumbers import phonenumberutil as _pu

__all__ = [
    "SMS_CAPABLE_TYPES",
    "PhoneCheck",
    "PhoneValidator",
    "check_phone_naive",
]

_sre: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")
#: libphonenumber's own compiled-pattern cache (not in its type stubs).
_re_compile: Any = _pu.re_compile  # type: ignore[attr-defined]


class PhoneCheck(NamedTuple):
    """The answer for one raw string: ``e164`` is None when the number is not valid."""

    e164: str | None
    sms_capable: bool


#: Number types that can receive SMS (see the module docstring for why both).
SMS_CAPABLE_TYPES: Final = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})
_INVALID: Final = PhoneCheck(None, False)
#: libphonenumber refuses longer input before looking at it.
_MAX_INPUT: Final = 250
_MIN_NSN: Final = 2
_MAX_NSN: Final = 17
#: Length verdicts after which parse() keeps the national prefix instead of stripping it.
_KEEP_PREFIX: Final = (
    _pu.ValidationResult.TOO_SHORT,
    _pu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    _pu.ValidationResult.INVALID_LENGTH,
)


def check_phone_naive(raw: str, region: str | None) -> PhoneCheck:
    """The reference: one full libphonenumber parse and validation per string."""
    try:
        number = phonenumbers.parse(raw, region)
    except NumberParseException:
        return _INVALID
    if not phonenumbers.is_valid_number(number):
        return _INVALID
    return PhoneCheck(
        phonenumbers.format_number(number, PhoneNumberFormat.E164),
        phonenumbers.number_type(number) in SMS_CAPABLE_TYPES,
    )


def _classify_nsn(cc: int, nsn: str) -> tuple[bool, bool]:
    """(valid, sms_capable) of a national significant number, by libphonenumber itself."""
    number = phonenumbers.PhoneNumber(country_code=cc, national_number=int(nsn))
    _pu._set_italian_leading_zeros_for_phone_number(nsn, number)
    if not phonenumbers.is_valid_number(number):
        return False, False
    return True, phonenumbers.number_type(number) in SMS_CAPABLE_TYPES


# --- digit automata over libphonenumber's patterns -------------------------------------------

_ALL_DIGITS: Final = (1 << 10) - 1
_NONE, _ALL, _MIXED = 0, 1, 2


class _Unsupported(Exception):
    """The pattern uses a construct the automaton builder does not model."""


class _Nfa:
    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []

    def new(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1


def _char_mask(items: list[tuple[Any, Any]]) -> int:
    mask, negate = 0, False
    for op, av in items:
        if op is _c.LITERAL:
            if 48 <= av <= 57:
                mask |= 1 << (av - 48)
        elif op is _c.RANGE:
            lo, hi = max(av[0], 48), min(av[1], 57)
            for code in range(lo, hi + 1):
                mask |= 1 << (code - 48)
        elif op is _c.CATEGORY and av is _c.CATEGORY_DIGIT:
            mask |= _ALL_DIGITS
        elif op is _c.NEGATE:
            negate = True
        else:
            raise _Unsupported(str(op))
    return (~mask & _ALL_DIGITS) if negate else mask


def _build(nfa: _Nfa, items: Any, cur: int) -> int:
    """Thompson construction; returns the fragment's end state (no outgoing edges yet)."""
    for op, av in items:
        if op is _c.LITERAL:
            mask = 1 << (av - 48) if 48 <= av <= 57 else 0
        elif op is _c.NOT_LITERAL:
            mask = _ALL_DIGITS & ~(1 << (av - 48) if 48 <= av <= 57 else 0)
        elif op is _c.ANY:
            mask = _ALL_DIGITS
        elif op is _c.IN:
            mask = _char_mask(av)
        elif op is _c.SUBPATTERN:
            cur = _build(nfa, av[3], cur)
            continue
        elif op is _c.BRANCH:
            end = nfa.new()
            for alt in av[1]:
                start = nfa.new()
                nfa.eps[cur].append(start)
                nfa.eps[_build(nfa, alt, start)].append(end)
            cur = end
            continue
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            for _ in range(low):
                cur = _build(nfa, body, cur)
            if high is _c.MAXREPEAT:
                loop, start, end = nfa.new(), nfa.new(), nfa.new()
                nfa.eps[cur].append(loop)
                nfa.eps[loop] += [start, end]
                nfa.eps[_build(nfa, body, start)].append(loop)
                cur = end
            else:
                for _ in range(high - low):
                    start, end = nfa.new(), nfa.new()
                    nfa.eps[cur] += [start, end]
                    nfa.eps[_build(nfa, body, start)].append(end)
                    cur = end
            continue
        else:
            raise _Unsupported(str(op))
        nxt = nfa.new()
        nfa.edges[cur].append((mask, nxt))
        cur = nxt
    return cur


class _Dfa:
    """Lazily determinized automaton over the digits 0-9 for one pattern.

    ``status(state, r)`` says whether all (``_ALL``), none (``_NONE``) or some (``_MIXED``) of
    the digit strings of length ``r`` lead from ``state`` to acceptance.
    """

    def __init__(self, pattern: str, *, prefix_match: bool) -> None:
        nfa = _Nfa()
        start = nfa.new()
        end = _build(nfa, _sre.parse(pattern), start)
        if prefix_match:  # re.match: any prefix in the language is enough
            nfa.edges[end].append((_ALL_DIGITS, end))
        self._nfa, self._final = nfa, end
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._trans: list[list[int] | None] = []
        self._status: dict[tuple[int, int], int] = {}
        self.start = self._intern(self._closure({start}))

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for nxt in self._nfa.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def _intern(self, states: frozenset[int]) -> int:
        found = self._ids.get(states)
        if found is None:
            found = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._trans.append(None)
        return found

    def step(self, state: int, digit: int) -> int:
        row = self._trans[state]
        if row is None:
            row = []
            for d in range(10):
                bit = 1 << d
                targets = {to for s in self._sets[state] for mask, to in self._nfa.edges[s] if mask & bit}
                row.append(self._intern(self._closure(targets)))
            self._trans[state] = row
        return row[digit]

    def status(self, state: int, remaining: int) -> int:
        key = (state, remaining)
        found = self._status.get(key)
        if found is not None:
            return found
        if remaining == 0:
            result = _ALL if self._final in self._sets[state] else _NONE
        elif not self._sets[state]:
            result = _NONE
        else:
            seen = {self.status(self.step(state, d), remaining - 1) for d in range(10)}
            result = seen.pop() if len(seen) == 1 else _MIXED
        self._status[key] = result
        return result


@dataclass(slots=True)
class _Predicate:
    lengths: frozenset[int]  # empty: any length
    dfa: _Dfa


def _predicates_for(cc: int) -> list[_Predicate] | None:
    """Every regex libphonenumber consults for numbers of this calling code, or None."""
    regions = _pu.COUNTRY_CODE_TO_REGION_CODE.get(cc, ())
    preds: list[_Predicate] = []
    try:
        for region in regions:
            md = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
            if md is None:
                continue
            if md.leading_digits is not None:
                preds.append(_Predicate(frozenset(), _Dfa(md.leading_digits, prefix_match=True)))
            for desc in (
                md.general_desc, md.premium_rate, md.toll_free, md.shared_cost, md.voip,
                md.personal_number, md.pager, md.uan, md.voicemail, md.fixed_line, md.mobile,
            ):  # fmt: skip
                if desc is None or not desc.national_number_pattern:
                    continue
                dfa = _Dfa(desc.national_number_pattern, prefix_match=False)
                preds.append(_Predicate(frozenset(desc.possible_length or ()), dfa))
    except (_Unsupported, re.error, OverflowError):
        return None
    return preds


# --- the fast validator ----------------------------------------------------------------------

_SHAPE: Final = re.compile(r"[ ().\-]*(\+?)([0-9 ().\-]*)")
_DROP: Final = str.maketrans("", "", " ().-")
#: "49" -> 49 for every calling code libphonenumber knows (same table as _extract_country_code).
_CALLING_CODES: Final = {str(cc): cc for cc in _pu.COUNTRY_CODE_TO_REGION_CODE}


@dataclass
class PhoneValidator:
    """Exact, faster equivalent of :func:`check_phone_naive` for one default region.

    Not thread-safe (plain dict caches); build one per worker. ``cache_size`` bounds each cache
    (a full cache is cleared, which keeps memory bounded whatever the audience size).
    """

    default_region: str | None = "US"
    cache_size: int = 200_000
    _raw_cache: dict[str, tuple[str | None, bool]] = field(default_factory=dict, init=False, repr=False)
    _key_cache: dict[str, tuple[str | None, bool]] = field(default_factory=dict, init=False, repr=False)
    #: (cc * 32 + national length) -> (decision depths in ascending order, {nsn prefix: answer})
    _tables: dict[int, tuple[list[int], dict[str, tuple[bool, bool]]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _memo_size: int = field(default=0, init=False, repr=False)
    _cc_plans: dict[str, tuple[int, int, Any, re.Pattern[str] | None]] = field(
        default_factory=dict, init=False, repr=False
    )
    _preds: dict[int, list[_Predicate] | None] = field(default_factory=dict, init=False, repr=False)
    _md: Any = field(default=None, init=False, repr=False)
    _cc_md: dict[int, Any] = field(default_factory=dict, init=False, repr=False)
    _idd: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.default_region is not None:
            self.default_region = self.default_region.upper()
            if self.default_region in _pu.SUPPORTED_REGIONS:
                self._md = phonenumbers.PhoneMetadata.metadata_for_region(self.default_region)
                if self._md.international_prefix:
                    self._idd = re.compile(self._md.international_prefix)

    def check(self, raw: str) -> PhoneCheck:
        """Same answer as ``check_phone_naive(raw, self.default_region)``."""
        e164, sms = self.lookup(raw)
        return PhoneCheck(e164, sms)

    def lookup(self, raw: str) -> tuple[str | None, bool]:
        """:meth:`check` as a plain ``(e164 or None, sms_capable)`` tuple (the planner's hot path)."""
        if len(raw) <= _MAX_INPUT:
            # the common shape: separators " ().-" anywhere, one optional "+" before any digit
            key = raw if raw[:1] == "+" and raw.isascii() and raw[1:].isdigit() else raw.translate(_DROP)
            digits = key[1:] if key[:1] == "+" else key
            if len(digits) >= 3 and digits.isdigit() and digits.isascii():
                found = self._key_cache.get(key)
                if found is None:
                    found = self._from_digits(len(digits) != len(key), digits)
                    if found is None:
                        found = check_phone_naive(raw, self.default_region)
                    if len(self._key_cache) >= self.cache_size:
                        self._key_cache.clear()
                    self._key_cache[key] = found
                return found
        found = self._raw_cache.get(raw)
        if found is None:
            found = check_phone_naive(raw, self.default_region)
            if len(self._raw_cache) >= self.cache_size:
                self._raw_cache.clear()
            self._raw_cache[raw] = found
        return found

    def _from_digits(self, plus: bool, digits: str) -> tuple[str | None, bool] | None:
        """Replay of ``phonenumbers.parse`` for the simple shape; None means "ask the naive path"."""
        md = self._md
        if not plus:
            if md is None:
                return None
            if self._idd is not None:
                idd = self._idd.match(digits)
                if idd is not None and not digits[idd.end() :].startswith("0"):
                    plus, digits = True, digits[idd.end() :]
        if plus:
            if len(digits) <= _MIN_NSN or digits[0] == "0":
                return None
            # calling codes are a prefix code: at most one of the three prefixes matches
            plan = self._cc_plans.get(digits[:1]) or self._cc_plans.get(digits[:2]) or self._cc_plans.get(digits[:3])
            if plan is None:
                plan = self._cc_plan(digits)
                if plan is None:
                    return None
            cc, size, md, national_prefix = plan
            nsn = digits[size:]
        else:
            cc, nsn = md.country_code, digits
            national_prefix = self._national_prefix(md)
            cc_str = str(cc)
            if digits.startswith(cc_str):
                general = md.general_desc
                _, potential, _ = _pu._maybe_strip_national_prefix_carrier_code(digits[len(cc_str) :], md)
                if (
                    not _pu._match_national_number(digits, general, False)
                    and _pu._match_national_number(potential, general, False)
                ) or _pu._test_number_length(digits, md) == _pu.ValidationResult.TOO_LONG:
                    nsn = potential
                    number_region = _pu.region_code_for_country_code(cc)
                    if number_region != self.default_region:
                        md = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(cc, number_region)
                        national_prefix = self._national_prefix(md)
        if md is None:
            return None
        if len(nsn) < _MIN_NSN:
            return _INVALID
        if national_prefix is not None and national_prefix.match(nsn):
            _, potential, _ = _pu._maybe_strip_national_prefix_carrier_code(nsn, md)
            if _pu._test_number_length(potential, md) not in _KEEP_PREFIX:
                nsn = potential
        length = len(nsn)
        if not _MIN_NSN <= length <= _MAX_NSN:
            return _INVALID
        # the classification memo (see _classify), inlined: this runs once per distinct number
        table = self._tables.get(cc * 32 + length)
        if table is not None:
            memo = table[1]
            for k in table[0]:
                found = memo.get(nsn[:k])
                if found is not None:
                    return (f"+{cc}{nsn}", found[1]) if found[0] else _INVALID
        valid, sms = self._classify(cc, nsn)
        return (f"+{cc}{nsn}", sms) if valid else _INVALID

    def _cc_plan(self, digits: str) -> tuple[int, int, Any, re.Pattern[str] | None] | None:
        for size in (1, 2, 3):
            cc = _CALLING_CODES.get(digits[:size], 0)
            if cc:
                md = self._md_for(cc)
                plan = (cc, size, md, self._national_prefix(md) if md is not None else None)
                self._cc_plans[digits[:size]] = plan
                return plan
        return None

    def _national_prefix(self, md: Any) -> re.Pattern[str] | None:
        """The compiled ``national_prefix_for_parsing`` of ``md`` (libphonenumber's own cache)."""
        prefix = md.national_prefix_for_parsing
        return _re_compile(prefix) if prefix else None

    def _md_for(self, cc: int) -> Any:
        """Metadata parse() uses after extracting ``cc`` (the default region's when it is cc's main)."""
        md = self._cc_md.get(cc)
        if md is None:
            number_region = _pu.region_code_for_country_code(cc)
            if number_region == self.default_region:
                md = self._md
            else:
                md = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(cc, number_region)
            self._cc_md[cc] = md
        return md

    def _classify(self, cc: int, nsn: str) -> tuple[bool, bool]:
        length = len(nsn)
        table = self._tables.get(cc * 32 + length)
        if table is not None:
            for k in table[0]:
                found = table[1].get(nsn[:k])
                if found is not None:
                    return found
        if cc not in self._preds:
            self._preds[cc] = _predicates_for(cc)
        preds = self._preds[cc]
        answer = _classify_nsn(cc, nsn)
        if preds is None:
            return answer
        k = self._decision_depth(preds, nsn)
        if self._memo_size >= self.cache_size:
            self._tables.clear()
            self._memo_size = 0
        table = self._tables.setdefault(cc * 32 + length, ([], {}))
        table[1][nsn[:k]] = answer
        self._memo_size += 1
        if k not in table[0]:
            table[0].append(k)
            table[0].sort()
        return answer

    @staticmethod
    def _decision_depth(preds: list[_Predicate], nsn: str) -> int:
        """Smallest k such that every predicate is constant on strings of len(nsn) starting nsn[:k]."""
        length = len(nsn)
        live = [p.dfa for p in preds if not p.lengths or length in p.lengths]
        states = [dfa.start for dfa in live]
        for k in range(length + 1):
            remaining = length - k
            if all(dfa.status(s, remaining) != _MIXED for dfa, s in zip(live, states, strict=True)):
                return k
            digit = ord(nsn[k]) - 48
            states = [dfa.step(s, digit) for dfa, s in zip(live, states, strict=True)]
        return length
