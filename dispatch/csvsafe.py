"""CSV cells that a spreadsheet opens as text, never as a formula (CSV injection).

OWASP's advice (https://owasp.org/www-community/attacks/CSV_Injection): a cell that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is prefixed with a single quote ``'``
(the csv module then quotes it and doubles any ``"`` inside). Every CSV file dispatch writes
from data it did not make itself (the plan's rejected rows, ``dispatch export --format csv``)
passes its cells through :func:`safe_cell`. Phone numbers in E.164 form start with ``+``, so
they are prefixed too: ``'+447400123456`` (strip a leading ``'`` when reading such a file back).
Numbers written as numbers (not text) are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, TypeVar

__all__ = ["FORMULA_TRIGGERS", "safe_cell", "safe_row"]

#: First characters that make a spreadsheet read a cell as a formula (OWASP).
FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")

T = TypeVar("T")


def safe_cell(value: T) -> T | str:
    """``value`` with a ``'`` in front when it is text beginning with a formula trigger."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def safe_row(row: Iterable[T]) -> list[T | str]:
    """:func:`safe_cell` of every cell."""
    return [safe_cell(value) for value in row]
