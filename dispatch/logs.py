"""Log set-up of the long-running processes: text lines, or one JSON object per line.

``DISPATCH_LOG_FORMAT=json`` (setting ``log_format``) makes every record one JSON object with
``ts``, ``level``, ``logger``, ``message`` and the structured fields a record carries in its
``extra`` (the batch line of ``dispatch.send.resilience`` carries ``batch``: campaign, batch
number, counts, duration). What is logged never holds an address or a token: the call sites log
ids, counts and the adapters' PII-free reasons only.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final, Literal

import orjson

__all__ = ["STRUCTURED_FIELDS", "JsonFormatter", "configure_logging"]

#: The ``extra`` keys copied into a JSON line.
STRUCTURED_FIELDS: Final = ("batch", "provider", "campaign")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(log_format: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once, at a process's start (never at import)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
