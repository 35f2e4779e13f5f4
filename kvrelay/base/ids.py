"""Ids and wall-clock times: component ids, request ids, epoch milliseconds and deadlines.

Times that cross the bus are unix epoch milliseconds (``*_ms``) so any language can read them;
a deadline of 0 means "none".
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid

MAX_COMPONENT_ID = 64
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")


def now_ms() -> int:
    """Unix epoch milliseconds."""
    return int(time.time() * 1000)


def remaining_s(deadline_ms: int) -> float | None:
    """Seconds left before ``deadline_ms``; None when there is no deadline (0)."""
    if deadline_ms <= 0:
        return None
    return (deadline_ms - now_ms()) / 1000.0


def component_id(prefix: str = "") -> str:
    """``[<prefix>-]<hostname>-<pid>`` made into a subject token of at most 64 characters."""
    host = _NOT_TOKEN.sub("-", socket.gethostname()).strip("-") or "host"
    head = f"{prefix}-" if prefix else ""
    suffix = f"-{os.getpid()}"
    return (head + host)[: MAX_COMPONENT_ID - len(suffix)] + suffix


def request_id() -> str:
    """A fresh request id: 32 hex characters."""
    return uuid.uuid4().hex
