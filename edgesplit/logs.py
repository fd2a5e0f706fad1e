"""Log output for the long-running commands: human text, or one JSON object per line.

JSON lines (``--log-format json``) are what log shippers (Loki, Elasticsearch, CloudWatch) parse
without a pattern: each record is ``{"ts", "level", "logger", "msg", ...}`` where ``ts`` is UTC
ISO 8601 with milliseconds, ``msg`` is the formatted message, and the structured fields a call
passes with ``extra={...}`` (``event``, ``agent``, ``bundle``, ...) follow as keys of their own; a
traceback, when there is one, is in ``exc``. Values that JSON cannot hold are written as strings.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else on a record came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Configure the root logger for a command: ``fmt`` is ``text`` or ``json``. A no-op when the
    root logger already has handlers (an application embedding the command keeps its own)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
