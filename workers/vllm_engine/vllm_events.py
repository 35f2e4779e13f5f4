"""vLLM's KV cache events -> kvrelay ``KvEventBatch`` on the bus, with kvrelay's own block hashes.

vLLM publishes its events over ZMQ (``KVEventsConfig(publisher="zmq")``); this module binds the
SUB socket on a free loopback port (an endpoint without ``*`` makes vLLM's PUB *connect*, so the
subscriber binds) and hands the endpoint to vLLM through ``VllmRuntime.kv_events_endpoint``.
Frames are ``[topic, seq (8 bytes BE), msgpack KVEventBatch]``.

Hashes: vLLM names blocks with its own chained hash; routers use ``schemas.hashing`` (salted
XXH64 chain). ``KvHashTranslator`` recomputes ours from each ``BlockStored``'s token ids: the
chain continues from our hash of ``parent_block_hash`` (looked up in a map vLLM hash -> ours),
or from the tenant's root when the event starts at token 0.

Tenants: the engines pass the request's tenant as vLLM's ``cache_salt``, so tenants never share
vLLM blocks, and vLLM puts the salt in ``extra_keys`` of the first block of a prompt (and only
there; later blocks inherit it through the parent hash). The translator reads the tenant back
from ``extra_keys[0]`` (its last string element) and computes the root exactly as the router
does: ``spec.root(tenant_salt(secret, tenant))`` with the deployment's ``cache.tenant_salt_secret`` (an
empty secret still salts by the tenant's name). An empty tenant means no cache_salt (vLLM ignores
an empty salt), hence no extra key: the root of tenant "" either way.

Bounds and policies: the map holds at most ``max_blocks`` distinct vLLM hashes, each with a
reference count (vLLM can store one hash twice and remove it twice). Storing a new hash into a
full map evicts the oldest entry and publishes its removal, so routers never believe more than
the map holds. A ``BlockStored`` whose parent is unknown (evicted from the map, or stored before
this process listened) is dropped and counted: routing for those blocks is only suboptimal.
ZMQ's receive queue is bounded by ``rcv_hwm`` (ZMQ drops past it); sequence gaps are counted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from kvrelay.base.logs import get_logger
from kvrelay.base.tasks import cancel_and_wait
from kvrelay.schemas.hashing import CacheConfig, HashSpec, block_hashes, tenant_salt
from kvrelay.schemas.kv_events import MAX_EVENT_BLOCKS
from kvrelay.transport.bus import Bus
from kvrelay.transport.kv_event_publisher import KvEventPublisher
from kvrelay.workers.errors import EngineError

log = get_logger(__name__)

TOPIC = "kvrelay"


class EventSink(Protocol):
    """Where translated events go (``KvEventPublisher`` has these three)."""

    def stored(self, hashes: Sequence[int], parent: int | None = None, num_tokens: int = 0) -> None: ...
    def removed(self, hashes: Sequence[int]) -> None: ...
    def cleared(self) -> None: ...


def cache_salt(tenant: str) -> str | None:
    """What the engines pass to vLLM as ``cache_salt`` for a request of ``tenant``."""
    return tenant or None


def _tenant_of(extra_keys: Any) -> str:
    """The cache_salt vLLM put in the first block's extra keys ("" when none)."""
    if not extra_keys:
        return ""
    first = extra_keys[0]
    if isinstance(first, str):
        return first
    if isinstance(first, (tuple, list)):
        strings = [k for k in first if isinstance(k, str)]
        return strings[-1] if strings else ""
    return ""


class KvHashTranslator:
    """Pure state machine: vLLM events in, kvrelay events out to ``sink`` (None: state only)."""

    def __init__(self, spec: HashSpec, salt_secret: str = "", max_blocks: int = 1 << 20,
                 sink: EventSink | None = None) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.spec, self.salt_secret, self.max_blocks, self.sink = spec, salt_secret, max_blocks, sink
        self._map: OrderedDict[Any, list[int]] = OrderedDict()  # vllm hash -> [our hash, refs]
        self.counters = dict.fromkeys(("stored", "removed", "cleared", "unknown_parent", "unknown_removed",
                                       "evicted", "bad_events", "other_groups"), 0)

    def root(self, tenant: str) -> int:
        return self.spec.root(tenant_salt(self.salt_secret, tenant))

    def held(self) -> list[int]:
        """Every kvrelay hash held, a hash held twice listed twice (for snapshots)."""
        return [h for h, refs in self._map.values() for _ in range(refs)]

    def ours(self, vllm_hash: Any) -> int | None:
        entry = self._map.get(vllm_hash)
        return entry[0] if entry else None

    def apply(self, event: Any) -> None:
        """One vLLM event (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``, by name)."""
        kind = type(event).__name__
        if getattr(event, "group_idx", None) not in (None, 0):
            self.counters["other_groups"] += 1  # only the full-attention group is indexed
        elif kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            self._removed(list(event.block_hashes))
        elif kind == "AllBlocksCleared":
            self._map.clear()
            self.counters["cleared"] += 1
            if self.sink is not None:
                self.sink.cleared()
        else:
            self.counters["bad_events"] += 1

    def _stored(self, ev: Any) -> None:
        vhashes, bs = list(ev.block_hashes), self.spec.block_size
        tokens = list(ev.token_ids)
        if (not vhashes or len(vhashes) > MAX_EVENT_BLOCKS or ev.block_size != bs
                or len(tokens) != len(vhashes) * bs):
            self.counters["bad_events"] += 1
            log.warning("vllm_kv_event_bad", blocks=len(vhashes), block_size=ev.block_size,
                        tokens=len(tokens))
            return
        if ev.parent_block_hash is None:
            parent, start = None, self.root(_tenant_of(ev.extra_keys))
        else:
            parent = self.ours(ev.parent_block_hash)
            if parent is None:
                self.counters["unknown_parent"] += 1
                return
            start = parent
        ours = block_hashes(tokens, bs, start)
        evicted: list[int] = []
        for vh, oh in zip(vhashes, ours):
            entry = self._map.get(vh)
            if entry is not None:
                entry[1] += 1
                continue
            if len(self._map) >= self.max_blocks:  # full: evict the oldest, told after the store
                _, (old, refs) = self._map.popitem(last=False)
                evicted.extend([old] * refs)
                self.counters["evicted"] += 1
            self._map[vh] = [oh, 1]
        self.counters["stored"] += len(ours)
        if self.sink is not None:
            self.sink.stored(ours, parent=parent, num_tokens=len(tokens))
            for i in range(0, len(evicted), MAX_EVENT_BLOCKS):
                self.sink.removed(evicted[i:i + MAX_EVENT_BLOCKS])

    def _removed(self, vhashes: list[Any]) -> None:
        gone: list[int] = []
        for vh in vhashes:
            entry = self._map.get(vh)
            if entry is None:
                self.counters["unknown_removed"] += 1
                continue
            gone.append(entry[0])
            entry[1] -= 1
            if entry[1] <= 0:
                del self._map[vh]
        self.counters["removed"] += len(gone)
        if gone and self.sink is not None:
            for i in range(0, len(gone), MAX_EVENT_BLOCKS):
                self.sink.removed(gone[i:i + MAX_EVENT_BLOCKS])


class VllmKvEvents:
    """ZMQ SUB (bound on loopback) -> ``KvHashTranslator`` -> ``KvEventPublisher``.

    ``bind()`` before vLLM starts (gives the endpoint vLLM connects to), ``start()`` after,
    ``close()`` at stop; owns one receive task and the publisher.
    """

    def __init__(self, bus: Bus, worker_id: str, spec: HashSpec, salt_secret: str = "",
                 max_blocks: int = 1 << 20, rcv_hwm: int = 100_000, recv_timeout_s: float = 1.0) -> None:
        self.worker_id = worker_id
        self.publisher = KvEventPublisher(bus, worker_id, spec.fingerprint, self._held)
        self.translator = KvHashTranslator(spec, salt_secret, max_blocks, sink=self.publisher)
        self.rcv_hwm, self.recv_timeout_s = rcv_hwm, recv_timeout_s
        self.endpoint = ""
        self._ctx: Any = None
        self._sock: Any = None
        self._task: asyncio.Task | None = None
        self._last_seq: int | None = None
        self.gaps = 0

    def _held(self) -> list[int]:
        return self.translator.held()

    def bind(self) -> str:
        """Bind the SUB socket on a free loopback port; returns the endpoint for vLLM."""
        if self._sock is not None:
            return self.endpoint
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, self.rcv_hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        try:
            port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        except zmq.ZMQError as exc:
            self._close_sock()
            raise EngineError(f"cannot bind the KV events socket: {exc}") from exc
        self.endpoint = f"tcp://127.0.0.1:{port}"
        return self.endpoint

    def vllm_config(self) -> dict[str, Any]:
        """``kv_events_config`` for vLLM's engine args (``bind`` first)."""
        if not self.endpoint:
            raise EngineError("bind() the KV events socket before configuring vLLM")
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint,
                "topic": TOPIC}

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        await self.publisher.start()
        self._task = asyncio.create_task(self._recv_loop(), name=f"vllm-kv-events-{self.worker_id}")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        self._close_sock()
        await self.publisher.close()

    def _close_sock(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _recv_loop(self) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.translator.counters["bad_events"] += 1
                continue
            self._check_seq(int.from_bytes(frames[1], "big"))
            try:
                batch = decoder.decode(frames[2])
            except msgspec.DecodeError as exc:
                self.translator.counters["bad_events"] += 1
                log.warning("vllm_kv_batch_undecodable", error=str(exc))
                continue
            for ev in batch.events:
                self.translator.apply(ev)

    def _check_seq(self, seq: int) -> None:
        if self._last_seq is not None and seq != self._last_seq + 1:
            self.gaps += 1
            log.warning("vllm_kv_events_gap", worker=self.worker_id, expected=self._last_seq + 1, got=seq)
        self._last_seq = seq


class KvEventsMixin:
    """What the vLLM engines add to publish KV events: ``attach_bus`` (before ``start``), then
    ``_start_kv_events`` after vLLM is up and ``_stop_kv_events`` at stop. Needs ``self._rt``
    (a ``VllmRuntime``) and ``self.cache`` (the deployment's cache contract)."""

    _kv_events: VllmKvEvents | None = None
    cache: CacheConfig  # the deployment's cache contract (block size, hash seed, tenant salt secret)

    def attach_bus(self, bus: Bus, worker_id: str) -> None:
        if self._kv_events is not None:
            raise EngineError("KV events are already being published")
        self._kv_events = VllmKvEvents(bus, worker_id, self.cache.spec, self.cache.tenant_salt_secret)
        self._kv_events.bind()
        self._rt.kv_events_config = self._kv_events.vllm_config()  # type: ignore[attr-defined]

    async def _start_kv_events(self) -> None:
        if self._kv_events is not None:
            await self._kv_events.start()

    async def _stop_kv_events(self) -> None:
        if self._kv_events is not None:
            await self._kv_events.close()
            self._kv_events = None
