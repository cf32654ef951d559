"""Structured logs: one JSON object per line, for the node's events and for everything else.

Only technical identifiers go into events (UIDs, AE titles, addresses, counts, states).
Patient names, IDs and birth dates never do: callers pass explicit fields, never datasets.

Libraries (pydicom, pynetdicom, highdicom, ...) and Python warnings go through the same
formatter, so every line on stderr is JSON. Their messages may quote values read from a data
set ("Invalid value for VR PN: 'DOE^JOHN'"), so quoted text in them is replaced by '…' and
their routine output is demoted: INFO and pydicom's warnings to DEBUG, pynetdicom's ERRORs
(an unreachable peer that the outbox retries anyway) to WARNING. Uncaught exceptions in any
thread are logged as one JSON line with the exception's type and scrubbed message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any

_FIELDS = "event_fields"
_OWN = ("common", "node", "inference", "training", "benchmarks", "__main__")
# Quoted text, bytes literals and long hex/number runs that a library may echo from a data set.
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*"|\\x[0-9a-fA-F]{2}(?:\\x[0-9a-fA-F]{2})+""")
# Libraries whose every message is chatter from the node's point of view: at most DEBUG.
_CHATTY = ("pydicom", "highdicom")


def scrub(text: str) -> str:
    """Remove quoted values (the only place libraries put data-set content) from a message."""
    return _QUOTED.sub("'…'", text)


def _is_own(name: str) -> bool:
    return name.split(".", 1)[0] in _OWN


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            error = self.formatException(record.exc_info).splitlines()[-1]
            entry["error"] = error if _is_own(record.name) else scrub(error)
        return json.dumps(entry, default=str)


class _LibraryRecords(logging.Filter):
    """Levels and scrubbing for records that do not come from the node's own loggers."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "py.warnings":
            _as_warning_event(record)
        elif not _is_own(name):
            top = name.split(".", 1)[0]
            level = record.levelno
            if top in _CHATTY or level <= logging.INFO:
                level = min(level, logging.DEBUG)
            elif top == "pynetdicom" and level >= logging.ERROR:
                level = logging.WARNING
            if level != record.levelno:
                record.levelno, record.levelname = level, logging.getLevelName(level)
            try:
                message = record.getMessage()
            except Exception:  # a library's broken format string must not lose the line
                message = str(record.msg)
            record.msg, record.args = scrub(message), None
        return record.levelno >= self.threshold


def _as_warning_event(record: logging.LogRecord) -> None:
    """`logging.captureWarnings` hands over 'file:line: Category: message\\n  source'."""
    text = str(record.args[0]) if record.args else str(record.msg)
    first = text.splitlines()[0] if text else ""
    match = re.match(r"^(.*?):(\d+): (\w+): (.*)$", first)
    if match:
        path, line, category, message = match.groups()
        source = f"{os.path.basename(path)}:{line}"
        library = "site-packages" in path or "dist-packages" in path
    else:
        source, category, message, library = "", "Warning", first, False
    fields = {"category": category, "source": source, "message": scrub(message)}
    record.msg, record.args = "python_warning", None
    setattr(record, _FIELDS, fields)
    if library:  # a library's warning is about its own use or about data: chatter
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"


def setup(level: str = "INFO") -> None:
    threshold = logging.getLevelName(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_LibraryRecords(threshold))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    debug = threshold <= logging.DEBUG
    # pynetdicom logs every PDU at INFO and may print dataset contents at DEBUG; highdicom and
    # pydicom chatter is demoted to DEBUG anyway: don't even create those records unless asked.
    for name in ("pynetdicom", "highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
        logging.getLogger(name).propagate = True
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else None
    )
    sys.unraisablehook = lambda args: _log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback, "unraisable"
    )


def _log_uncaught(exc_type: Any, exc: Any, tb: Any, thread: str | None = None) -> None:
    if exc_type is SystemExit:
        return
    if isinstance(exc_type, type) and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C: a stop, not a failure
        logging.getLogger("node.uncaught").info(
            "interrupted", extra={_FIELDS: {"thread": thread or threading.current_thread().name}})
        return
    logging.getLogger("node.uncaught").error(
        "uncaught_exception",
        extra={_FIELDS: {"thread": thread or threading.current_thread().name,
                         "error": f"{exc_type.__name__}: {scrub(str(exc))}",
                         "where": _where(tb)}},
    )


def _where(tb: Any) -> str:
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return ""
    return f"{os.path.basename(last.tb_frame.f_code.co_filename)}:{last.tb_lineno}"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    logger.log(level, name, extra={_FIELDS: fields})
