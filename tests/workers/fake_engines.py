"""Deterministic in-memory engines for the worker-service tests (test doubles of the engine only).

They follow ``kvrelay.workers.engine``'s Protocols: tokens are derived from the prompt, KV exports
are counted in blocks with real leases (release / expiry), and tests steer them through
``asyncio.Event`` gates, per-request failures and ``abort``. ``until(pred)`` waits, with a
timeout, for the engine's state to satisfy a condition (every state change wakes it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from kvrelay.schemas.messages import KVDescriptor, KVLayout, PrefillDone, PrefillTask
from kvrelay.workers.engine import EngineInfo, EngineStats, PrefillOutput, TokenDelta
from kvrelay.workers.errors import EngineError, ExportFull

VOCAB = 1000
BLOCK_SIZE = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BLOCK_SIZE, dtype="float32",
                  page_elems=BLOCK_SIZE * 2 * 4)
GATE_LIMIT_S = 30.0  # a gate nobody opens fails the test instead of hanging it


def first_token(prompt: list[int]) -> int:
    return (sum(prompt) * 7 + len(prompt)) % VOCAB


def decode_tokens(first: int, n: int) -> list[int]:
    """The tokens the fake decode engine produces after ``first``."""
    return [(first + i + 1) % VOCAB for i in range(n)]


class _Observable:
    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        self._changed.set()

    async def until(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``pred()`` holds; TimeoutError after ``timeout``."""
        async def loop() -> None:
            while not pred():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


async def _either(gate: asyncio.Event, abort: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(abort.wait())]
    try:
        await asyncio.wait(waits, timeout=GATE_LIMIT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


class FakePrefillEngine(_Observable):
    """``max_tokens == 1`` finishes in prefill ("length", no KV); otherwise the KV is exported
    as ``ceil(len(prompt) / BLOCK_SIZE)`` blocks of ``export_blocks``, leased for ``lease_ms``."""

    def __init__(self, export_blocks: int = 256, lease_ms: int = 30_000, model: str = "fake") -> None:
        super().__init__()
        self.info = EngineInfo(model=model, block_size=BLOCK_SIZE, hash_seed="seed", layout=LAYOUT,
                               backends=("shm",), max_model_len=4096)
        self.export_blocks = export_blocks
        self.lease_ms = lease_ms
        self.gate: asyncio.Event | None = None  # when set to an Event, prefill waits for it
        self.fail: dict[str, Exception] = {}  # request id -> raised by prefill
        self.started: list[str] = []
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.leases: dict[int, tuple[str, int, int]] = {}  # ticket -> (request id, blocks, expires_ms)
        self.released: list[int] = []
        self.expired: list[int] = []
        self.is_started = self.is_stopped = False
        self.attached: str | None = None  # the worker id attach_bus gave
        self._aborts: dict[str, asyncio.Event] = {}
        self._next_ticket = 1

    def attach_bus(self, bus: object, worker_id: str) -> None:
        assert not self.is_started, "attach_bus comes before start"
        self.attached = worker_id

    async def start(self) -> None:
        self.is_started = True

    async def stop(self) -> None:
        self.is_stopped = True
        self.leases.clear()

    async def prefill(self, task: PrefillTask) -> PrefillOutput:
        rid = task.request_id
        self.started.append(rid)
        self.running.add(rid)
        abort = self._aborts.setdefault(rid, asyncio.Event())
        self._bump()
        try:
            if self.gate is not None:
                await _either(self.gate, abort)
            if abort.is_set():
                return PrefillOutput(first_token_id=0, text="", finish_reason="abort", kv=None)
            if rid in self.fail:
                raise self.fail[rid]
            tok = first_token(task.prompt_token_ids)
            if task.sampling.max_tokens == 1:
                return PrefillOutput(first_token_id=tok, text=f"t{tok}", finish_reason="length", kv=None)
            return PrefillOutput(first_token_id=tok, text=f"t{tok}", finish_reason=None,
                                 kv=self._export(task), prefill_ms=1.0)
        finally:
            self.running.discard(rid)
            self._aborts.pop(rid, None)
            self._bump()

    def _export(self, task: PrefillTask) -> KVDescriptor:
        need = -(-len(task.prompt_token_ids) // BLOCK_SIZE)
        if self.free_blocks < need:
            raise ExportFull(f"{need} blocks needed, {self.free_blocks} free")
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        expires = int(time.time() * 1000) + self.lease_ms
        self.leases[ticket] = (task.request_id, need, expires)
        return KVDescriptor(backend="shm", worker_id="fake", host="localhost", region="fake-region",
                            block_ids=list(range(need)), num_tokens=len(task.prompt_token_ids), ticket=ticket,
                            lease_expires_ms=expires, layout=LAYOUT)

    @property
    def free_blocks(self) -> int:
        return self.export_blocks - sum(b for _, b, _ in self.leases.values())

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        ev = self._aborts.get(request_id)
        if ev is not None:
            ev.set()
        self._bump()

    def release(self, ticket: int) -> bool:
        self.released.append(ticket)
        self._bump()
        return self.leases.pop(ticket, None) is not None

    def expire_leases(self, now_ms: int) -> int:
        gone = [t for t, (_, _, exp) in self.leases.items() if exp <= now_ms]
        for t in gone:
            del self.leases[t]
        self.expired.extend(gone)
        if gone:
            self._bump()
        return len(gone)

    def stats(self) -> EngineStats:
        held = sum(b for _, b, _ in self.leases.values())
        return EngineStats(running=len(self.running), free_kv_blocks=self.free_blocks, exported_blocks=held,
                           export_free_blocks=self.free_blocks)


class FakeDecodeEngine(_Observable):
    """Yields ``max_tokens - 1`` tokens after the first, one per delta, the last with "length".

    ``import_gate``: the first delta waits for it (a KV import in progress). ``hold_at``/``hold``:
    before delta number ``hold_at`` it waits for ``hold``. ``fail_after[rid] = k`` raises
    ``EngineError`` after ``k`` deltas. ``abort`` ends the stream with a "abort" delta.
    """

    def __init__(self, free_kv_blocks: int = 100, model: str = "fake") -> None:
        super().__init__()
        self.info = EngineInfo(model=model, block_size=BLOCK_SIZE, hash_seed="seed", layout=LAYOUT,
                               backends=("shm",), max_model_len=4096)
        self.free_kv_blocks = free_kv_blocks
        self.import_gate: asyncio.Event | None = None
        self.hold_at: int | None = None
        self.hold = asyncio.Event()
        self.fail_after: dict[str, int] = {}
        self.started: list[str] = []
        self.running: set[str] = set()
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.kv_bytes_moved = 0
        self.is_started = self.is_stopped = False
        self._aborts: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        self.is_started = True

    async def stop(self) -> None:
        self.is_stopped = True

    async def stream(self, done: PrefillDone) -> AsyncIterator[TokenDelta]:
        rid = done.request_id
        self.started.append(rid)
        self.running.add(rid)
        abort = self._aborts.setdefault(rid, asyncio.Event())
        self._bump()
        try:
            if self.import_gate is not None:
                await _either(self.import_gate, abort)
            self.kv_bytes_moved += done.kv.num_tokens * 64
            tokens = decode_tokens(done.first_token_id, done.sampling.max_tokens - 1)
            for i, tok in enumerate(tokens):
                if self.hold_at == i:
                    await _either(self.hold, abort)
                if abort.is_set():
                    yield TokenDelta(token_ids=[], text="", finish_reason="abort")
                    return
                if self.fail_after.get(rid) == i:
                    raise EngineError(f"injected failure after {i} deltas")
                last = i == len(tokens) - 1
                if last:
                    self.finished.append(rid)
                yield TokenDelta(token_ids=[tok], text=f"t{tok}", finish_reason="length" if last else None,
                                 kv_loaded_tokens=len(done.prompt_token_ids) if i == 0 else 0)
            if not tokens:
                self.finished.append(rid)
                yield TokenDelta(token_ids=[], text="", finish_reason="length")
        finally:
            self.running.discard(rid)
            self._aborts.pop(rid, None)
            self.closed.append(rid)
            self._bump()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        ev = self._aborts.get(request_id)
        if ev is not None:
            ev.set()
        self._bump()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), free_kv_blocks=self.free_kv_blocks,
                           kv_bytes_moved=self.kv_bytes_moved)
