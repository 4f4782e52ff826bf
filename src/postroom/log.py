"""Logging with the Postfix queue id on every line, so an admin greps one id across both logs.

The id travels in a context variable set by the adapter for the mail it is handling; the formatter adds it.
"""

from __future__ import annotations

import contextvars
import logging
import sys

queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("postroom_queue_id", default="-")


class _QueueIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "queue_id"):
            record.queue_id = queue_id.get()
        return True


class MessageLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one mail's queue id, for code that runs outside the adapter's context."""

    def process(self, msg: object, kwargs: dict[str, object]) -> tuple[object, dict[str, object]]:  # type: ignore[override]
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})  # type: ignore[call-overload]
        kwargs["extra"] = extra
        return msg, kwargs


def message_logger(qid: str, name: str = "postroom") -> MessageLogger:
    return MessageLogger(logging.getLogger(name), {"queue_id": qid or queue_id.get()})


FORMAT = "%(asctime)s %(levelname)s %(queue_id)s: %(message)s"


def setup(level: str = "info") -> None:
    """Log to stderr (journald under systemd) with the queue id in every line."""
    # FORMAT shows none of these, so no log record needs to look them up (the logging HOWTO's "Optimization":
    # thread, process and multiprocessing names, and the caller's file and line, which _srcfile = None skips).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_QueueIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
