"""``kvrelay up``'s restart policy for its children: pure and synchronous, tested without processes.

A child that exits while the deployment runs is restarted after a back-off that doubles with each
restart inside the window (``backoff_initial_s``, ``2x``, ``4x`` ... capped at ``backoff_max_s``).
At most ``max_restarts`` restarts per child in any ``window_s`` seconds: one more exit inside the
window exhausts the child, and ``kvrelay up`` stops the whole deployment (exit code 1) instead of
restarting it in a loop. Exits older than the window are forgotten, so a child that dies once a
day is restarted every time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvrelay.schemas.struct import Struct, limit, typed


@typed
class SuperviseConfig(Struct):
    """Config section ``supervise``: how ``kvrelay up`` restarts a child that died."""

    max_restarts: int = limit(5, min=0, max=1000)  # per child, inside any window_s; 0 = never restart
    window_s: float = limit(300.0, min=1.0, max=86400.0)
    backoff_initial_s: float = limit(0.5, min=0.0, max=600.0)
    backoff_max_s: float = limit(10.0, min=0.0, max=3600.0)


@dataclass(frozen=True)
class Decision:
    """What to do about one exit: restart after ``delay_s``, or give up (``restart`` false)."""

    restart: bool
    delay_s: float = 0.0
    restarts_in_window: int = 0


class RestartPolicy:
    """One child's restart budget. ``on_exit(now)`` for each exit -> ``Decision``.

    Bounded: it remembers at most ``max_restarts`` restart times.
    """

    def __init__(self, cfg: SuperviseConfig) -> None:
        self.cfg = cfg
        self._restarts: deque[float] = deque(maxlen=max(1, cfg.max_restarts))
        self.total = 0  # restarts over the child's life, for logs

    def on_exit(self, now: float) -> Decision:
        while self._restarts and now - self._restarts[0] >= self.cfg.window_s:
            self._restarts.popleft()
        if self.cfg.max_restarts == 0 or len(self._restarts) >= self.cfg.max_restarts:
            return Decision(restart=False, restarts_in_window=len(self._restarts))
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * (2 ** len(self._restarts)))
        self._restarts.append(now)
        self.total += 1
        return Decision(restart=True, delay_s=delay, restarts_in_window=len(self._restarts))
