"""Logging for the daemon: structlog over stdlib, written by a thread.

Not on a TTY (systemd, a pipe, a file) each record is one JSON object per line.
When the stream is the journal's (``$JOURNAL_STREAM`` names its device and
inode, systemd.exec(5)) each line is prefixed with its syslog priority in angle
brackets (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug; ``<2>``
critical) so that journald files it at the right level (sd-daemon(3)); anywhere
else (a pipe, a file) the line is plain JSON, so that ``jq`` reads every line.
On a TTY the records are rendered for people. Both structlog loggers and stdlib
loggers (the protocol library uses one, with its fields as ``extra=``) end up in
the same stream.

The event loop never writes to stdout itself: a slow journal or a full pipe
must not delay a dose stop. Records go to a bounded queue and a listener
thread writes them; if the queue is full a record is dropped and counted.

Context: ``bind_contextvars(session_id=…, port=…, step=…)`` in a task adds
those keys to every record that task (and the tasks it starts) logs.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

QUEUE_RECORDS = 10_000

PRIORITY: dict[str, int] = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
    "notset": 7,
}

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops (and counts) rather than blocks or raises when full."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Render in the calling thread (context variables live there), hand over text.
        message = self.format(record)
        record = logging.makeLogRecord(record.__dict__)
        record.msg = message
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return record


class _StreamWriter(logging.Handler):
    """Writes pre-rendered lines to a stream and flushes each (journald reads lines)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(f"{record.msg}\n")
            self.stream.flush()
        except (OSError, ValueError):
            # stdout closed or broken: nothing left to tell.
            pass


def plain_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """One JSON object per line (a pipe, a file: what `jq` reads)."""
    return json.dumps(event_dict, default=str, ensure_ascii=False)


def journald_json(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    """One JSON object per line with the syslog priority prefix journald understands."""
    level = str(event_dict.get("level", method)).lower()
    priority = PRIORITY.get(level, 6)
    return f"<{priority}>" + json.dumps(event_dict, default=str, ensure_ascii=False)


def is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal's: its device and inode are those that
    systemd put in $JOURNAL_STREAM (systemd.exec(5)), not merely inherited by a
    child whose output goes somewhere else."""
    raw = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = raw.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (StringIO), closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _drop_logger_name_if_structlog(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    # structlog loggers have no meaningful stdlib name ("pbmd"); keep it for stdlib ones.
    if event_dict.get("logger") in (None, "pbmd"):
        event_dict.pop("logger", None)
    return event_dict


_listener: logging.handlers.QueueListener | None = None
_queue_handler: _DroppingQueueHandler | None = None


def configure(
    level: LogLevel = "info",
    fmt: LogFormat = "auto",
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and stdlib logging for the daemon (idempotent)."""
    global _listener, _queue_handler
    shutdown()
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Processor
    if fmt == "json":
        renderer = journald_json if is_journal(out) else plain_json
        exc: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        exc = []
    formatter = structlog.stdlib.ProcessorFormatter(
        # Stdlib loggers (the protocol library) pass their fields as `extra=`.
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_logger_name_if_structlog,
            *exc,
            renderer,
        ],
    )
    q: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_RECORDS)
    handler = _DroppingQueueHandler(q)
    handler.setFormatter(formatter)
    writer = _StreamWriter(out)
    _listener = logging.handlers.QueueListener(q, writer)
    _listener.start()
    _queue_handler = handler

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # The simulator logs every host (re)connection at INFO; that is debug for the daemon.
    logging.getLogger("pbmd.hw_sim").setLevel(max(_LEVELS[level], logging.WARNING))

    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        context_class=dict,
        cache_logger_on_first_use=False,
    )


def dropped() -> int:
    """Records dropped because the writer could not keep up."""
    return _queue_handler.dropped if _queue_handler is not None else 0


def shutdown() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener, _queue_handler
    if _listener is not None:
        _listener.stop()
        _listener = None
    if _queue_handler is not None:
        logging.getLogger().removeHandler(_queue_handler)
        _queue_handler = None


def bind(**values: Any) -> None:
    """Bind keys to every record the current task (and its children) log."""
    structlog.contextvars.bind_contextvars(**values)


def context() -> MutableMapping[str, Any]:
    return structlog.contextvars.get_contextvars()
