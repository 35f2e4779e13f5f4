"""Session KV kept across tool pauses: which finished requests' blocks a decode engine holds. Pure.

An agent's step ends with a tool call; its next step comes back seconds later with the same
prefix plus the tool's result. Meanwhile other traffic can evict the step's blocks from vLLM's
prefix cache, and the next step recomputes (or re-transfers) its whole context. A step that asks
for it (``kv_ttl_s``) has its blocks *pinned* when it finishes: the connector's
``request_finished`` returns "free later" (vLLM's delayed free, the mechanism P/D exporters use),
so the blocks stay allocated, and in the prefix cache, until the connector reports the request
as sent. A pin ends:

- ``hit``: a request of the same session arrives (its prefix-cache lookup has run by then);
- ``expired``: its TTL passed (capped by ``max_ttl_ms``);
- ``evicted``: a newer pin needed the room (budget full: the oldest pins go first);
- ``replaced``: the same session pinned a newer step without a request in between.

A pin is ``refused`` when its blocks alone exceed the budget. Bounded: at most ``max_sessions``
pins and ``max_blocks`` pinned blocks; over either, the oldest pins are evicted (LRU by pin time).
While pins are held vLLM steps its engine (empty steps sleep 1 ms) so expiries are seen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pin:
    request_id: str
    blocks: int
    expires_ms: int


@dataclass
class PinDecision:
    pinned: bool
    # (request id, outcome, blocks) of pins that end now: their blocks are freed
    ended: list[tuple[str, str, int]] = field(default_factory=list)


class PinTable:
    def __init__(self, max_blocks: int, max_sessions: int, max_ttl_ms: int) -> None:
        if max_blocks < 0 or max_sessions < 0 or max_ttl_ms < 0:
            raise ValueError("pin limits must be >= 0")
        self.max_blocks, self.max_sessions, self.max_ttl_ms = max_blocks, max_sessions, max_ttl_ms
        self._pins: OrderedDict[str, Pin] = OrderedDict()  # session -> pin, oldest first
        self.blocks = 0

    def __len__(self) -> int:
        return len(self._pins)

    def _end(self, session: str, outcome: str) -> tuple[str, str, int]:
        pin = self._pins.pop(session)
        self.blocks -= pin.blocks
        return pin.request_id, outcome, pin.blocks

    def arrive(self, session: str) -> list[tuple[str, str, int]]:
        """A request of ``session`` is being scheduled: its pin (if any) ends as a hit."""
        return [self._end(session, "hit")] if session in self._pins else []

    def offer(self, session: str, request_id: str, blocks: int, ttl_ms: int, now_ms: int) -> PinDecision:
        """A finished request asks to keep its ``blocks`` for ``ttl_ms``."""
        if blocks > self.max_blocks or self.max_sessions == 0 or ttl_ms <= 0:
            return PinDecision(False)
        ended = [self._end(session, "replaced")] if session in self._pins else []
        while self._pins and (self.blocks + blocks > self.max_blocks or len(self._pins) >= self.max_sessions):
            ended.append(self._end(next(iter(self._pins)), "evicted"))
        self._pins[session] = Pin(request_id, blocks, now_ms + min(ttl_ms, self.max_ttl_ms))
        self.blocks += blocks
        return PinDecision(True, ended)

    def expire(self, now_ms: int) -> list[tuple[str, str, int]]:
        """Pins whose TTL passed."""
        gone = [s for s, p in self._pins.items() if p.expires_ms <= now_ms]
        return [self._end(s, "expired") for s in gone]
