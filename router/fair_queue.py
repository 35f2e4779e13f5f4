"""The orders of the admission queue (router/admission.py ``AdmissionQueue``), pure and synchronous:
``FifoOrder`` (``router.admission_order`` "fifo") and ``FairOrder`` ("fair", the default): weighted
fair sharing over tokens, VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).

Every tenant has a virtual token counter: the tokens it was served (prompt + max_tokens, charged
when a request is placed on a worker), divided by its weight (``TenantSpec.weight``; 1 without a
tenants file). The next request to try is the oldest waiter of the *backlogged* tenant (one with
requests waiting here) whose counter is the smallest; on equal counters the tenant with fewer
waiters per unit of weight goes first, then the one whose oldest waiter came first.

- **No banked credit.** A tenant that becomes backlogged again has its counter lifted to the
  smallest counter of the backlogged tenants (none backlogged: to the counter of the tenant
  charged last), so time spent idle or below its share earns it nothing.
- **Refunds.** A request charged max_tokens that produced fewer tokens is refunded the rest when
  it ends (``refund``), but never below the counter its tenant's last lift gave it: a refund cannot
  bank credit either.
- **Placed without waiting.** A request placed at once (nobody waiting) is charged too, as an
  arrival into an empty line (lifted first): VTC counts all service, contested or not.
- **Push-out.** When the queue is full, a request of a tenant holding less than its weighted share
  of it takes the place of the newest waiter of the tenant holding the most per unit of weight
  (``victim``): a flood cannot fill the queue and starve others with 429s.

State is bounded: waiters by the queue's capacity; tenants by those with waiters plus the
``max_idle`` most recently seen others (an older one's counter is forgotten: when it comes back it
is lifted like any other).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

MAX_IDLE_TENANTS = 1024
MIN_WEIGHT = 1e-6


class Order(Protocol):
    """How ``AdmissionQueue``'s waiters are ordered: ``FifoOrder`` or ``FairOrder``."""

    def __len__(self) -> int: ...
    def add(self, key: str, tenant: str) -> None: ...
    def remove(self, key: str) -> bool: ...
    def head(self) -> str | None: ...
    def position(self, key: str) -> int: ...
    def victim(self, tenant: str) -> str | None: ...
    def charge(self, tenant: str, tokens: int) -> None: ...
    def refund(self, tenant: str, tokens: int) -> None: ...


class FifoOrder:
    """First come, first served (``router.admission_order`` "fifo"): tenants and tokens are ignored."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, tenant: str) -> None:
        self._keys[key] = None

    def remove(self, key: str) -> bool:
        return self._keys.pop(key, False) is None

    def head(self) -> str | None:
        return next(iter(self._keys), None)

    def position(self, key: str) -> int:
        """0 for the head; -1 when ``key`` is not waiting."""
        return next((i for i, k in enumerate(self._keys) if k == key), -1)

    def victim(self, tenant: str) -> str | None:
        return None

    def charge(self, tenant: str, tokens: int) -> None:
        pass

    def refund(self, tenant: str, tokens: int) -> None:
        pass


class _Tenant:
    __slots__ = ("name", "counter", "floor", "line")

    def __init__(self, name: str) -> None:
        self.name, self.counter, self.floor = name, 0.0, 0.0
        self.line: OrderedDict[str, int] = OrderedDict()  # waiting keys -> join sequence, oldest first


class FairOrder:
    """The order of ``AdmissionQueue``'s waiters by weighted virtual token counters (see module doc)."""

    def __init__(self, weight: Callable[[str], float] | None = None,
                 max_idle: int = MAX_IDLE_TENANTS) -> None:
        self._weight = weight or (lambda _tenant: 1.0)
        self.max_idle = max_idle
        self._backlogged: dict[str, _Tenant] = {}
        self._idle: OrderedDict[str, _Tenant] = OrderedDict()  # least recently seen first
        self._where: dict[str, _Tenant] = {}  # waiting key -> its tenant
        self._last = 0.0  # the counter of the tenant charged last
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def weight(self, tenant: str) -> float:
        return max(MIN_WEIGHT, float(self._weight(tenant)))

    def counter(self, tenant: str) -> float | None:
        """``tenant``'s virtual token counter; None when it is not remembered."""
        t = self._backlogged.get(tenant) or self._idle.get(tenant)
        return None if t is None else t.counter

    def tenants(self) -> int:
        """Tenants remembered (backlogged + idle)."""
        return len(self._backlogged) + len(self._idle)

    # --- waiters ----------------------------------------------------------------------------------------
    def add(self, key: str, tenant: str) -> None:
        t = self._backlogged.get(tenant)
        if t is None:
            t = self._arriving(tenant)
            self._backlogged[tenant] = t
        t.line[key] = next(self._seq)
        self._where[key] = t

    def remove(self, key: str) -> bool:
        t = self._where.pop(key, None)
        if t is None:
            return False
        del t.line[key]
        if not t.line:
            del self._backlogged[t.name]
            self._remember(t)
        return True

    def head(self) -> str | None:
        """The waiter that tries next; None when nobody waits."""
        if not self._backlogged:
            return None
        t = min(self._backlogged.values(), key=self._rank)
        return next(iter(t.line))

    def position(self, key: str) -> int:
        """0 for the head, else 1 + how many of its own tenant's waiters are ahead of it; -1: not here."""
        t = self._where.get(key)
        if t is None:
            return -1
        if key == self.head():
            return 0
        return 1 + next(i for i, k in enumerate(t.line) if k == key)

    def victim(self, tenant: str) -> str | None:
        """The queue is full and ``tenant`` wants to join: the waiter it pushes out (the newest of the
        tenant holding the most places per unit of weight, when that is more than ``tenant`` would
        hold with one more), or None (it is turned away)."""
        if not self._backlogged:
            return None
        mine = self._backlogged.get(tenant)
        share = (len(mine.line) if mine else 0) + 1
        worst = max(self._backlogged.values(), key=lambda t: (len(t.line) / self.weight(t.name), -t.counter))
        if worst.name == tenant or len(worst.line) / self.weight(worst.name) <= share / self.weight(tenant):
            return None
        return next(reversed(worst.line))

    # --- service ----------------------------------------------------------------------------------------
    def charge(self, tenant: str, tokens: int) -> None:
        """``tenant`` was served ``tokens`` (a request placed: prompt + max_tokens)."""
        t = self._backlogged.get(tenant)
        if t is None:  # placed without waiting: an arrival into an empty line
            t = self._arriving(tenant)
            self._remember(t)
        t.counter += max(0, tokens) / self.weight(tenant)
        self._last = t.counter

    def refund(self, tenant: str, tokens: int) -> None:
        """A request of ``tenant`` produced ``tokens`` fewer than it was charged for."""
        t = self._backlogged.get(tenant) or self._idle.get(tenant)
        if t is not None and tokens > 0:
            t.counter = max(t.floor, t.counter - tokens / self.weight(tenant))

    # --- internals --------------------------------------------------------------------------------------
    def _arriving(self, tenant: str) -> _Tenant:
        """A tenant that becomes backlogged: remembered or new, its counter lifted (no banked credit)."""
        t = self._idle.pop(tenant, None) or _Tenant(tenant)
        low = min((b.counter for b in self._backlogged.values()), default=self._last)
        if t.counter < low:
            t.counter = t.floor = low
        return t

    def _remember(self, t: _Tenant) -> None:
        self._idle[t.name] = t
        self._idle.move_to_end(t.name)
        while len(self._idle) > self.max_idle:
            self._idle.popitem(last=False)

    def _rank(self, t: _Tenant) -> tuple[float, float, int]:
        return t.counter, len(t.line) / self.weight(t.name), next(iter(t.line.values()))
