"""Logs as JSON lines (API, its access log, and worker): one object per line with ``time``, ``level``, ``logger``,
``message``, ``trace_id`` and ``span_id`` (of the span the line was written in, when tracing is on; absent
otherwise), and ``exception`` (the traceback) where there is one."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from service import tracing

__all__ = ["JsonFormatter", "TraceIds", "configure", "uvicorn_config"]


class TraceIds(logging.Filter):
    """Puts the current span's ids on each record when it is emitted (in the emitting thread and context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            ids = tracing.ids()
            record.trace_id, record.span_id = ids if ids is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        trace_id = getattr(record, "trace_id", None)
        if trace_id is not None:
            line["trace_id"], line["span_id"] = trace_id, getattr(record, "span_id", None)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str) -> None:
    """The root logger writes JSON lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def uvicorn_config() -> dict[str, Any]:
    """uvicorn's ``log_config``: its own loggers (errors and the access log) in the same JSON lines."""
    formatter = {"()": f"{__name__}.JsonFormatter"}
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
               "filters": ["trace_ids"]}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"json": formatter},
            "filters": {"trace_ids": {"()": f"{__name__}.TraceIds"}},
            "handlers": {"default": handler},
            "loggers": {name: {"handlers": ["default"], "level": "INFO", "propagate": False}
                        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}}
