"""structlog setup: JSON in production, readable lines in a terminal."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from bus.tracing import trace_id_of


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def add_trace_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The current span's trace id on every line, so one job's lines can be found across roles."""
    trace_id = trace_id_of()
    if trace_id is not None:
        event_dict.setdefault("trace_id", trace_id)
    return event_dict
