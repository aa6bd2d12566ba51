"""The relay's log lines: human text by default, or one JSON object per line for a shipper.

With `logging.format: json` every line is `{"time", "level", "logger", "message", ...}`
plus the structured fields a call passes in `extra` (`LOG_FIELDS`), so a log shipper can
filter by run, token, status or reason without parsing the message. A token is always
written redacted, whoever passed it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from events.types import iso_ms
from relay.config import LoggingConfig
from relay.tokens import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The structured fields a log call may carry in `extra`, written in this order when set.
LOG_FIELDS = ("run", "token", "status", "reason", "halt_class", "done", "total", "rate",
              "eta_s")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values stay escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso_ms(int(record.created * 1000)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = redact(str(value)) if name == "token" else value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(config: LoggingConfig) -> None:
    """The root logger's level and format, as `logging` in the configuration says
    (like `logging.basicConfig`, a no-op when the root logger has handlers already)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if config.format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=config.level, handlers=[handler])
