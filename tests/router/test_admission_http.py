"""Admission that waits, end to end over a real nats-server: HTTP clients and the fake workers of
conftest.py ("hold" with a ``capacity`` refuses while that many of its streams are unfinished)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from conftest import Cluster

CHAT = {"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}


async def _post(url: str, body: Any = CHAT) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=json.dumps(body)) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def _ready(cluster: Cluster, mode: str = "hold", capacity: int = 1, **router_cfg):
    router = await cluster.router(**router_cfg)
    worker = await cluster.worker("p0", mode, capacity=capacity)
    await cluster.worker("d0", role="decode")
    await cluster.seen(router, 1, 1)
    return router, worker


def _waiting(router) -> float:
    return router.metrics.admission_waiting._value.get()


async def test_admission_http_burst_beyond_capacity_waits_and_all_complete(cluster: Cluster) -> None:
    # a back-off this long would take minutes: they are placed because capacity frees, signalled
    router, worker = await _ready(cluster, capacity=2, admission_max_backoff_s=30.0)
    burst = [asyncio.create_task(_post(router.url)) for _ in range(8)]
    await cluster.wait_until(lambda: len(worker.accepted) == 2 and _waiting(router) == 6, what="2 held, 6 waiting")
    worker.release.set()
    results = await asyncio.gather(*burst)
    assert [r[0] for r in results] == [200] * 8, results
    assert len(worker.accepted) == 8 and _waiting(router) == 0
    assert router.metrics.admission_wait._sum.get() > 0
    refused = len(worker.tasks) - 8
    assert refused <= 6 + 12, refused  # only the head retries, with a back-off: no hammering


async def test_admission_http_full_queue_is_429_with_retry_after(cluster: Cluster) -> None:
    router, worker = await _ready(cluster, max_waiting=2)
    held = asyncio.create_task(_post(router.url))
    await cluster.wait_until(lambda: len(worker.accepted) == 1, what="one held")
    waiting = [asyncio.create_task(_post(router.url)) for _ in range(2)]
    await cluster.wait_until(lambda: _waiting(router) == 2, what="two waiting")
    status, body, headers = await _post(router.url)
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "admission queue is full (2 requests waiting)" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert router.metrics.admission_rejections.labels("queue_full")._value.get() == 1
    worker.release.set()
    assert [r[0] for r in await asyncio.gather(held, *waiting)] == [200] * 3


async def test_admission_http_waiting_past_the_first_token_deadline_is_504(cluster: Cluster) -> None:
    router, worker = await _ready(cluster, mode="reject", first_token_timeout_s=0.5)
    status, body, _ = await _post(router.url)
    assert status == 504 and body["error"]["code"] == "timeout"
    assert "admission queue" in body["error"]["message"] and "first-token deadline" in body["error"]["message"]
    assert _waiting(router) == 0 and len(router.dispatcher.table) == 0
    assert router.metrics.admission_rejections.labels("deadline")._value.get() == 1


async def test_admission_http_disconnected_waiter_frees_its_place_and_the_next_is_served(cluster: Cluster) -> None:
    router, worker = await _ready(cluster, admission_max_backoff_s=30.0)
    held = asyncio.create_task(_post(router.url))
    await cluster.wait_until(lambda: len(worker.accepted) == 1, what="one held")
    gone = asyncio.create_task(_post(router.url))
    await cluster.wait_until(lambda: _waiting(router) == 1, what="the first waiter")
    served = asyncio.create_task(_post(router.url))
    await cluster.wait_until(lambda: _waiting(router) == 2, what="the second waiter")
    gone.cancel()  # the client disconnects while at the head of the queue
    await asyncio.gather(gone, return_exceptions=True)
    await cluster.wait_until(lambda: _waiting(router) == 1 and len(router.dispatcher.table) == 2,
                             what="its place and its slot freed")
    worker.release.set()
    assert (await held)[0] == 200 and (await served)[0] == 200
    assert len(worker.accepted) == 2  # the one that left never ran
    await cluster.wait_until(lambda: len(router.dispatcher.table) == 0, what="all slots freed")


async def _post_as(url: str, tenant: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=json.dumps(CHAT),
                                                    headers={"X-Kvrelay-Tenant": tenant}) as r:
        await r.read()
        return r.status


async def test_admission_http_fair_order_places_a_light_tenant_before_a_flood(cluster: Cluster) -> None:
    router, worker = await _ready(cluster, admission_max_backoff_s=30.0)
    held = asyncio.create_task(_post_as(router.url, "flood"))
    await cluster.wait_until(lambda: len(worker.accepted) == 1, what="one held")
    flood = []
    for n in range(1, 4):
        flood.append(asyncio.create_task(_post_as(router.url, "flood")))
        await cluster.wait_until(lambda n=n: _waiting(router) == n, what=f"{n} flood waiters")
    light = asyncio.create_task(_post_as(router.url, "light"))
    await cluster.wait_until(lambda: _waiting(router) == 4, what="the light waiter")
    worker.release.set()
    assert await asyncio.gather(held, *flood, light) == [200] * 5
    tenant = {t.request_id: t.tenant for t in worker.tasks}
    assert [tenant[r] for r in worker.accepted] == ["flood", "light", "flood", "flood", "flood"]
    wait = router.metrics.registry.get_sample_value
    assert wait("kvrelay_router_tenant_admission_wait_seconds_count", {"tenant": "open"}) == 4
