"""Turns on the simulated prefill engine's one compute unit, given out by a ``Schedule``.

With ``prefill.long_prompt_step_tokens`` > 0 the simulated prefill engine computes a prompt in
chunks of at most that many tokens, one turn per chunk (what vLLM's ``long_prefill_token_threshold``
does to a long prompt: others join at the next step). Between turns the waiting prompts are taken
by the prefill queue's ``Schedule`` (``workers/prefill_queue.py``): least work left first, aged,
never passed over more than ``max_overtakes`` times. So a short prompt that arrives while a long one
computes starts after the long one's current chunk, not after the whole long prompt.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvrelay.workers.prefill_queue import Schedule


@dataclass
class _Turn:
    work: int
    ready: asyncio.Future[None]
    queued_at: float = field(default_factory=time.monotonic)
    overtaken: int = 0


class Turns:
    """An asyncio lock whose waiters are taken by a ``Schedule`` instead of first come, first served."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.busy = False
        self.waiting: list[_Turn] = []

    def locked(self) -> bool:
        return self.busy

    async def acquire(self, work: int) -> None:
        """Wait for a turn; ``work``: tokens this prompt still has to compute (its place in the schedule)."""
        if not self.busy and not self.waiting:
            self.busy = True
            return
        turn = _Turn(work, asyncio.get_running_loop().create_future())
        self.waiting.append(turn)
        try:
            await turn.ready
        except asyncio.CancelledError:
            if turn.ready.done() and not turn.ready.cancelled():
                self.release()  # handed the turn just as it was cancelled: pass it on
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise

    def release(self) -> None:
        """End the current turn: the schedule's next waiter gets it, or the unit is idle."""
        while self.waiting:
            turn = self.schedule.take(self.waiting, time.monotonic())
            if not turn.ready.done():  # a cancelled waiter's future is done already: skip it
                turn.ready.set_result(None)
                return
        self.busy = False
