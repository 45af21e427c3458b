"""Log lines: text for people, JSON (one object per line) for collectors.

Both carry the trace and span ids of the current span when there is one, so a log line
leads to its trace. The gateway logs events, never requests: start, stop, Redis
connection changes, configuration problems. Pass ``extra={"event": "..."}`` (and any
other fields) to make a line easy to select; JSON lines keep every extra field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from opentelemetry import trace

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in W3C hex of the current span, or None (also when the trace
    is not sampled: nothing would be found under its ids)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """The classic one-line format, plus ``trace_id=... span_id=...`` inside a span; a
    worker's lines (`cachegw serve --workers N`) name it after the logger: ``cachegw[w1]``."""

    def __init__(self, worker: int | None = None) -> None:
        tag = f"[w{worker}]" if worker is not None else ""
        super().__init__(TEXT_FORMAT.replace("%(name)s", f"%(name)s{tag}"))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = trace_ids()
        if ids is not None:
            line += f" trace_id={ids[0]} span_id={ids[1]}"
        return line


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", <extra fields>, "trace_id", "span_id", "exc"}``,
    and ``"worker": <index>`` in a worker's lines."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        for key, value in extras(record).items():
            out.setdefault(key, value)
        ids = trace_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def setup(
    level: str = "INFO",
    fmt: str = "text",
    stream: IO[str] | None = None,
    *,
    worker: int | None = None,
) -> None:
    """Route every logger through one handler on `stream` (stderr) in `fmt`; `worker` is
    the index of a worker process, named in each of its lines."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
