"""How ``meshq`` commands log: plain text lines (the default) or, with ``--log-format json``, one JSON
object per line on stderr for log collectors (journald, Loki, Elasticsearch, ``jq``).

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``message`` (the
formatted text), then every field given with ``extra=`` in the logging call, and ``exception``
(the traceback text) when there is one. Values JSON cannot hold are written as their ``str``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from meshq.errors import ConfigError

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime",
                                                                                "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the ``extra=`` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def json_line(level: str, logger: str, message: str, **fields: object) -> str:
    """A line shaped as ``JsonFormatter`` writes it, for what is reported outside ``logging``."""
    record = logging.LogRecord(logger, getattr(logging, level), "", 0, message, (), None)
    record.levelname = level
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


def setup_logging(level: str | None, default: str, log_format: str | None = None) -> None:
    """Log to stderr at ``level`` (else ``default``) as ``log_format`` (``text`` or ``json``)."""
    if (log_format or "text") not in FORMATS:
        raise ConfigError(f"log format {log_format!r} (from MESHQ_LOG_FORMAT) is not one of {', '.join(FORMATS)}: "
                          f"unset MESHQ_LOG_FORMAT or give --log-format text|json")
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level or default), handlers=[handler], force=True)


class _Fields(logging.Filter):
    """Adds fixed fields (those a record does not carry already) to every record a handler writes."""

    def __init__(self, fields: dict) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def add_fields(**fields: object) -> None:
    """Every record logged from now on carries ``fields`` (in JSON lines; text lines do not show them):
    ``meshq node`` adds its node id and cluster once it knows them."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Fields(fields))
