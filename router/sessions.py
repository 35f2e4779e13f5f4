"""Client sessions -> the decode worker that ran their last step. Pure, synchronous, bounded.

A client that names a session (HTTP ``session_id`` / ``X-Session-Id``, NATS
``ClientRequest.session_id``) lets the router send the session's next step (the next chat turn,
an agent's next call) to the decode worker that produced the last one, which still holds its
KV: a local prefill there computes only the new suffix and moves no KV (``router/kv_policy.py``).

A record is written when a request of the session finishes on a decode worker (its final
``TokenChunk.worker``): the worker, the tokens it then held (prompt + output), and *marks* that
let a later prompt be checked against them without storing any tokens: ``(n, h)`` = the prompt
(or prompt + output) had ``n`` full blocks, the last of them with chained hash ``h``. Since
block hashes chain, a new prompt whose block ``n - 1`` has hash ``h`` starts with those ``n``
blocks exactly (``held_blocks``). The record is a hint: the worker may have evicted blocks since
(then the local prefill computes more, the output is the same).

Keys are ``(tenant, session id)``: a tenant cannot steer another tenant's session. At most
``max_sessions`` records; writing a new one past it evicts the least recently used (counted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Session:
    worker: str  # the decode worker of the last finished step
    tokens: int  # prompt + output tokens of that step (what the worker held at its end)
    marks: tuple[tuple[int, int], ...]  # (full blocks, hash of the last one), most blocks first


def marks(*chains: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Marks of block-hash chains (e.g. the prompt's and the prompt + output's), longest first."""
    out = {(len(c), c[-1]) for c in chains if c}
    return tuple(sorted(out, reverse=True))


def held_blocks(session: Session, hashes: Sequence[int]) -> int:
    """Leading blocks of a prompt (its chained ``hashes``) the session's worker held: 0 if none."""
    for n, h in session.marks:
        if n <= len(hashes) and hashes[n - 1] == h:
            return n
    return 0


class SessionMap:
    """``(tenant, session id) -> Session``, LRU, at most ``max_sessions`` (see the module doc)."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self._map: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._map)

    def get(self, tenant: str, session_id: str) -> Session | None:
        """The session's record (now the most recently used), or None."""
        key = (tenant, session_id)
        rec = self._map.get(key)
        if rec is not None:
            self._map.move_to_end(key)
        return rec

    def put(self, tenant: str, session_id: str, session: Session) -> None:
        key = (tenant, session_id)
        self._map[key] = session
        self._map.move_to_end(key)
        while len(self._map) > self.max_sessions:
            self._map.popitem(last=False)
            self.evictions += 1
