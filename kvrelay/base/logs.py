"""Structured logging: structlog, JSON lines by default, request ids bound through contextvars.

Usage::

    log = get_logger(__name__)
    with bound(request_id=rid):
        log.info("dispatched", worker=wid)
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_configured = False


def setup(component: str, level: str = "info", fmt: str = "json") -> None:
    """Configure structlog once per process; every line carries ``component``."""
    global _configured
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
    _configured = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind values (e.g. request_id) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
