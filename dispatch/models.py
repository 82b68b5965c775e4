"""Shared pieces of the pydantic models (the campaign spec, the API's request and response bodies).

pydantic v2 validates every input the outside hands us from one declaration per model: the campaign
file, the API's request bodies and the OpenAPI components are all derived from the models. This
module holds what the models share: :func:`field_errors`, which turns a ``ValidationError`` into
``(field, reason)`` pairs worded as the API has always worded them (``spec.rate``,
``recipients[3].x``; ``required``, ``unknown field``, ``expected string``...), and
:func:`problem` for validators that raise a message of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

__all__ = ["MAX_FIELD_ERRORS", "field_errors", "problem"]

#: At most this many field errors are reported for one body.
MAX_FIELD_ERRORS: Final = 50

#: pydantic's type-error kinds, in the JSON words the API uses.
_EXPECTED: Final = {
    "string_type": "string",
    "int_type": "integer",
    "int_from_float": "integer",
    "float_type": "number",
    "bool_type": "boolean",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "dataclass_type": "object",
    "list_type": "array",
    "none_required": "null",
}


def problem(message: str) -> PydanticCustomError:
    """A validator's own error; its message is the reason, word for word."""
    return PydanticCustomError("dispatch", message)


def _path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path = f"{path}[{part}]"
        elif part.startswith(("function-", "nullable")) or part in {"[key]"}:
            continue  # pydantic's wrapper names, not fields
        else:
            path = f"{path}.{part}" if path else part
    return path or "(body)"


def _n(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _items(ctx: dict[str, Any]) -> str:
    return "fields" if ctx.get("field_type") == "Dictionary" else "items"


#: Our wording of pydantic's error types (their ``ctx`` filled in); others keep pydantic's message.
_REASONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "missing": lambda ctx: "required",
    "extra_forbidden": lambda ctx: "unknown field",
    "literal_error": lambda ctx: (
        "expected one of " + str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
    ),
    "string_too_short": lambda ctx: f"shorter than {ctx['min_length']} characters",
    "string_too_long": lambda ctx: f"longer than {ctx['max_length']} characters",
    "string_pattern_mismatch": lambda ctx: f"does not match {ctx['pattern']}",
    "greater_than": lambda ctx: f"must be greater than {_n(ctx['gt'])}",
    "greater_than_equal": lambda ctx: f"less than {_n(ctx['ge'])}",
    "less_than_equal": lambda ctx: f"greater than {_n(ctx['le'])}",
    "too_short": lambda ctx: f"fewer than {ctx['min_length']} {_items(ctx)}",
    "too_long": lambda ctx: f"more than {ctx['max_length']} {_items(ctx)}",
    "finite_number": lambda ctx: "expected a finite number",
}
_REASONS["enum"] = _REASONS["literal_error"]


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    reason = _REASONS.get(kind)
    return reason(ctx) if reason is not None else str(error["msg"])


def field_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(field, reason)`` for each problem (at most :data:`MAX_FIELD_ERRORS`), fields written
    ``prefix.name[index].name``; a problem with the whole body is ``(body)`` (or ``prefix``)."""
    out: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False)[:MAX_FIELD_ERRORS]:
        pair = (_path(prefix, error["loc"]), _reason(error))
        if pair not in out:
            out.append(pair)
    return out
