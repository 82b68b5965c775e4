"""Shared pieces of the pydantic models (the campaign spec, the API's request and response bodies).

pydantic v2 validates every input the outside hands us from one declaration per model: the campaign
file, the API's request bodies and the OpenAPI components are all derived from the models. This
module holds what the models share: :func:`field_errors`, which turns a ``ValidationError`` into
``(field, reason)`` pairs worded as the API has always worded them (``spec.rate``,
``recipients[3].x``; ``required``, ``unknown field``, ``expected string``...), and
:func:`problem` for validators that raise a message of their own.
"""

from __future__ import annotations

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


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    if kind in {"literal_error", "enum"}:
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"expected one of {expected}"
    if kind == "string_too_short":
        return f"shorter than {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"longer than {ctx['max_length']} characters"
    if kind == "string_pattern_mismatch":
        return f"does not match {ctx['pattern']}"
    if kind == "greater_than":
        return f"must be greater than {_n(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"less than {_n(ctx['ge'])}"
    if kind == "less_than_equal":
        return f"greater than {_n(ctx['le'])}"
    if kind == "too_short":
        return f"fewer than {ctx['min_length']} {'fields' if ctx.get('field_type') == 'Dictionary' else 'items'}"
    if kind == "too_long":
        return f"more than {ctx['max_length']} {'fields' if ctx.get('field_type') == 'Dictionary' else 'items'}"
    if kind == "finite_number":
        return "expected a finite number"
    return str(error["msg"])


def field_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(field, reason)`` for each problem (at most :data:`MAX_FIELD_ERRORS`), fields written
    ``prefix.name[index].name``; a problem with the whole body is ``(body)`` (or ``prefix``)."""
    out: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False)[:MAX_FIELD_ERRORS]:
        pair = (_path(prefix, error["loc"]), _reason(error))
        if pair not in out:
            out.append(pair)
    return out
