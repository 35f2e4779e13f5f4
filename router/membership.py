"""Keeps the prefix index's set of workers in line with discovery.

The KV-events stream alone does not tell a router about every worker: its retention is bounded,
so a worker whose events all aged out (or that has not stored anything since the router started)
is unknown to a fresh router, and a worker that left stays in the index until something removes
it. Discovery (the workers bucket, ``transport.discovery.Directory``) is the source of truth for
who is live, so every ``interval_s`` the router reconciles the two:

- a live worker the index does not know is asked for a snapshot (once per worker incarnation,
  i.e. per ``(worker_id, started_ms)``: a worker that does not answer is not asked again until it
  restarts; ``KvEventsSubscriber`` already bounds each request's wait and retries);
- a worker the index knows but discovery no longer lists (it deleted its record on a clean exit,
  or its record aged past ``worker_ttl_s``) is removed from the index, with all its entries.

``plan`` is pure (tested without I/O); ``run`` is the loop owned by the router's app.
Bounds: the "asked" map holds live workers only (pruned every round), so it is at most the
directory's ``max_workers``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kvrelay.base.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class MembershipPlan:
    ask: list[str] = field(default_factory=list)  # live, not indexed: request a snapshot
    drop: list[str] = field(default_factory=list)  # indexed, not live: remove from the index


def plan(live: Mapping[str, int], indexed: Iterable[str], asked: Mapping[str, int]) -> MembershipPlan:
    """What to do, from the live workers ``{id: started_ms}``, the indexed ids and the
    incarnations already asked ``{id: started_ms}``. Pure."""
    indexed = set(indexed)
    ask = sorted(w for w, started in live.items() if w not in indexed and asked.get(w) != started)
    drop = sorted(w for w in indexed if w not in live)
    return MembershipPlan(ask, drop)


class IndexMembership:
    """The reconciling loop (``run`` until cancelled; the router app owns the task)."""

    def __init__(self, directory, subscriber, interval_s: float = 1.0) -> None:  # noqa: ANN001
        self.directory, self.subscriber, self.interval_s = directory, subscriber, interval_s
        self._asked: dict[str, int] = {}
        self.counters = dict.fromkeys(("asked", "dropped"), 0)
        self.ticked = asyncio.Event()  # set after every round (tests wait on it)

    def sync(self) -> MembershipPlan:
        """One round: ask new live workers for snapshots, drop departed ones."""
        live = {i.worker_id: i.started_ms for i in self.directory.live()}
        p = plan(live, self.subscriber.index.workers(), self._asked)
        for w in p.ask:
            self._asked[w] = live[w]
            self.counters["asked"] += 1
            log.info("kv_index_worker_joined", worker=w)
            self.subscriber.request_resync(w)
        for w in p.drop:
            self.counters["dropped"] += 1
            log.info("kv_index_worker_left", worker=w)
            self.subscriber.remove_worker(w)
        for w in [w for w in self._asked if w not in live]:
            del self._asked[w]
        return p

    async def run(self) -> None:
        """Reconcile every ``interval_s`` once discovery has delivered its initial records."""
        while not self.directory.synced.is_set():  # a router may start before the bucket answers
            await asyncio.sleep(self.interval_s)
        while True:
            self.sync()
            self.ticked.set()
            await asyncio.sleep(self.interval_s)


class MembershipCollector:
    """Prometheus: workers the index learned of through discovery, and workers it dropped."""

    def __init__(self, membership: IndexMembership) -> None:
        self.membership = membership

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        from prometheus_client.core import CounterMetricFamily

        c = self.membership.counters
        yield CounterMetricFamily("kvrelay_router_kv_index_joins",
                                  "Live workers the index did not know, asked for a snapshot", value=c["asked"])
        yield CounterMetricFamily("kvrelay_router_kv_index_leaves",
                                  "Workers removed from the index after leaving discovery", value=c["dropped"])
