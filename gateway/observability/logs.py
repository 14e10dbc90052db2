"""Logging set-up, the access line (one per request) and event lines (one per protective act:
an ejection, a drain), as text or as JSON.

A line's message is its fields as `key=value` pairs (what any handler shows), and the record
carries the fields themselves (`extra={"fields": {...}}`), which the JSON formatter writes as
keys. The fields are ids, names from the config and numbers, rounded to what they mean (`ms`
to 0.1 ms, `seconds` to the millisecond): never a key or a body.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

ACCESS = logging.getLogger("gateway.access")


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, log_format: str) -> None:
    """Root logging for the server: `log_format` is "text" or "json"."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines in the same format
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def access(fields: dict[str, Any]) -> None:
    event(ACCESS, logging.INFO, fields)


def event(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    """One line of `fields`, as `key=value` pairs or JSON keys."""
    if logger.isEnabledFor(level):  # nothing is formatted for a line not written
        line = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        logger.log(level, "%s", line, extra={"fields": fields})


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to 0.1 ms."""
    return round(seconds * 1000, 1)


def seconds(value: float) -> float:
    """Seconds to the millisecond."""
    return round(value, 3)


def _text(value: object) -> str:
    return "-" if value is None else str(value)
