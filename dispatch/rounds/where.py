"""The ``where`` language of a follow-up round: which recipients of an earlier campaign to keep.

    where = "opened and not clicked"
    where = "delivered and not (opened or machine_opened)"

Grammar (keywords and predicates are lower case, whitespace separates tokens)::

    expr   := term ("or" term)*
    term   := factor ("and" factor)*
    factor := "not" factor | "(" expr ")" | PREDICATE

Predicates (:data:`PREDICATES`), each about one message of the source campaign:

- ``sent``: the provider accepted it (record state sent, delivered or bounced, or failed by an
  undelivered receipt after it was sent);
- ``delivered`` / ``bounced``: the provider's receipt said so (record state);
- ``opened``: a human open in the engagement ledger (``open``; machine opens never count);
- ``machine_opened``: an open by a machine (``machine_open``: Apple MPP, ``sg_machine_open``);
- ``clicked``: a human click (``click``; ``bot_click`` never counts);
- ``replied``: a reply that was not an opt-out (``reply``);
- ``opted_out``: an opt-out or a spam complaint (``optout``, ``spamreport``).

Nothing is evaluated by ``eval``: an expression compiles to a truth table over the predicates'
bit mask (:meth:`Where.table`, 2**8 entries), so testing one message is one list index whatever
the expression. A bad expression raises :class:`WhereError` naming the token and its position
(0-based character offset).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from dispatch.errors import PlanError

__all__ = ["PREDICATES", "Where", "WhereError", "parse_where"]

#: Predicate name -> its bit in a message's mask.
PREDICATES: Final = {
    "sent": 1,
    "delivered": 2,
    "bounced": 4,
    "opened": 8,
    "machine_opened": 16,
    "clicked": 32,
    "replied": 64,
    "opted_out": 128,
}
#: Masks range over 0 .. MASKS - 1.
MASKS: Final = 1 << len(PREDICATES)
#: Longest expression accepted (characters).
MAX_LENGTH: Final = 1_000
_TOKEN: Final = re.compile(r"\s*(?:(\()|(\))|([A-Za-z_][A-Za-z0-9_]*)|(\S))")
_KEYWORDS: Final = frozenset({"and", "or", "not"})


class WhereError(PlanError):
    """A ``where`` expression that does not parse; the message names the token and its position."""


# An expression tree: a predicate's bit, or (op, operands...).
Node = int | tuple[str, "Node"] | tuple[str, "Node", "Node"]


@dataclass(frozen=True, slots=True)
class Where:
    """A parsed expression: its text and its truth table over :data:`PREDICATES` masks."""

    text: str
    table: tuple[bool, ...]

    def __call__(self, mask: int) -> bool:
        return self.table[mask]


def parse_where(text: str) -> Where:
    """Parse ``text`` (see the module docstring); :class:`WhereError` when it is not valid."""
    if not isinstance(text, str):
        raise WhereError(f"where: expected a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise WhereError(f"where: longer than {MAX_LENGTH} characters")
    tokens = _tokens(text)
    parser = _Parser(text, tokens)
    tree = parser.expr()
    if parser.pos < len(tokens):
        word, at = tokens[parser.pos]
        raise WhereError(f"where: unexpected {word!r} at position {at}; expected 'and', 'or' or the end")
    return Where(text, tuple(_evaluate(tree, mask) for mask in range(MASKS)))


def _tokens(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # only trailing whitespace is left
            break
        word = match.group(match.lastindex or 0)
        at = match.start(match.lastindex or 0)
        if match.group(4) is not None:
            raise WhereError(f"where: unexpected character {word!r} at position {at}")
        out.append((word, at))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, int]]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def _fail(self, expected: str) -> WhereError:
        if self.pos >= len(self.tokens):
            return WhereError(f"where: the expression ends at position {len(self.text)}; expected {expected}")
        word, at = self.tokens[self.pos]
        return WhereError(f"where: unexpected {word!r} at position {at}; expected {expected}")

    def expr(self) -> Node:
        node = self.term()
        while self._peek() == "or":
            self.pos += 1
            node = ("or", node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self._peek() == "and":
            self.pos += 1
            node = ("and", node, self.factor())
        return node

    def factor(self) -> Node:
        word = self._peek()
        predicates = "a predicate (" + ", ".join(PREDICATES) + "), 'not' or '('"
        if word is None:
            raise self._fail(predicates)
        if word == "not":
            self.pos += 1
            return ("not", self.factor())
        if word == "(":
            self.pos += 1
            node = self.expr()
            if self._peek() != ")":
                raise self._fail("')'")
            self.pos += 1
            return node
        if word in PREDICATES:
            self.pos += 1
            return PREDICATES[word]
        if word in _KEYWORDS or word == ")":
            raise self._fail(predicates)
        _, at = self.tokens[self.pos]
        raise WhereError(f"where: unknown predicate {word!r} at position {at}; one of {', '.join(PREDICATES)}")


def _evaluate(node: Node, mask: int) -> bool:
    if isinstance(node, int):
        return bool(mask & node)
    if node[0] == "not":
        return not _evaluate(node[1], mask)
    left, right = _evaluate(node[1], mask), _evaluate(node[2], mask)  # type: ignore[misc]
    return (left and right) if node[0] == "and" else (left or right)
