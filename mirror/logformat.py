"""How `mirror serve` writes its log: `log.format = "text"` or `"json"`.

text (the default) is for people: `time LEVEL logger: message`, local time.

json is one object per line for log shippers, with stable field names:
`time` (RFC 3339, UTC, milliseconds), `level` (debug, info, warning, error,
critical), `logger`, `message`, and `exception` (the traceback, as one
string) when there is one. An access line adds the fields in ACCESS_FIELDS,
which AccessLogger (mirror/api/server.py) hands over as the record's
`access` attribute. Strings are written by `json.dumps` with `ensure_ascii`,
so a value a client chose (a path, a User-Agent) can hold no raw control
character or line break: one record is one line.

docs/logging.md documents both, field by field.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# An access line's fields, in the order they are written.
ACCESS_FIELDS = (
    "remote",
    "method",
    "path",
    "proto",
    "status",
    "bytes",
    "duration_s",
    "cache",
    "registry",
    "request_id",
    "user_agent",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(created * 1000) % 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of a `log.format` value: "text" or "json"."""
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)
