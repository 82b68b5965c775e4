"""SMS segment counting (GSM 03.38 / 3GPP TS 23.038), the unit SMS rate limits and prices count.

A body made only of GSM-7 characters is sent in 7-bit septets: 160 fit in one SMS, 153 per part
once it is split (the user data header takes the rest). A character of the extension table
(``^{}\\[~]|€`` and form feed) costs two septets (escape + code) and is never split across parts.
Any other character forces UCS-2 for the whole body: 70 UTF-16 code units in one SMS, 67 per part,
and a surrogate pair (an emoji) is never split across parts.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["GSM7_BASIC", "GSM7_EXTENSION", "Encoding", "encoding", "segments", "septets"]

Encoding = Literal["GSM-7", "UCS-2"]

#: The GSM 03.38 default alphabet (the escape code 0x1B excluded: it is not a character).
GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: Characters of the GSM 03.38 extension table: each costs an escape septet plus its own.
GSM7_EXTENSION: Final = frozenset("\f^{}\\[~]|€")

_GSM7_SINGLE: Final = 160
_GSM7_PART: Final = 153
_UCS2_SINGLE: Final = 70
_UCS2_PART: Final = 67


def encoding(body: str) -> Encoding:
    """The encoding a body is sent in: GSM-7 when every character is in the GSM alphabet."""
    for char in body:
        if char not in GSM7_BASIC and char not in GSM7_EXTENSION:
            return "UCS-2"
    return "GSM-7"


def septets(body: str) -> int:
    """Septets a GSM-7 body takes (extension characters count two)."""
    return sum(2 if char in GSM7_EXTENSION else 1 for char in body)


def _unit_sizes(body: str, enc: Encoding) -> list[int]:
    """Size of each indivisible unit: septets (GSM-7) or UTF-16 code units (UCS-2)."""
    if enc == "GSM-7":
        return [2 if char in GSM7_EXTENSION else 1 for char in body]
    return [2 if ord(char) > 0xFFFF else 1 for char in body]


def segments(body: str) -> int:
    """Number of SMS parts ``body`` is sent as (at least 1)."""
    enc = encoding(body)
    sizes = _unit_sizes(body, enc)
    single, part = (_GSM7_SINGLE, _GSM7_PART) if enc == "GSM-7" else (_UCS2_SINGLE, _UCS2_PART)
    if sum(sizes) <= single:
        return 1
    count, used = 1, 0
    for size in sizes:  # greedy packing: a unit that does not fit starts the next part
        if used + size > part:
            count += 1
            used = 0
        used += size
    return count
