"""serve(): the router process comes up on its port, logs the URL, and stops cleanly."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import pytest
from structlog.testing import capture_logs

from kvrelay.config import Config
from kvrelay.router.app import RouterStartError, router_id, serve
from kvrelay.router.config import RouterConfig

if TYPE_CHECKING:
    from conftest import Cluster


async def test_app_serve_listens_logs_its_url_and_stops(cluster: Cluster) -> None:
    cfg = Config(bus=cluster.bus_config,
                 router=RouterConfig(http_port=0, model=str(cluster.tokenizer.folder), served_model_name="m1"))
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(serve(cfg, stop))

        def listening() -> list[dict]:
            return [e for e in logs if e["event"] == "router_listening"]

        await cluster.wait_until(lambda: bool(listening()) or task.done(), timeout=120, what="router up")
        url = listening()[0]["url"]
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "m1"
            async with s.get(url + "/health") as r:
                assert r.status == 503
        stop.set()
        await asyncio.wait_for(task, 30)
    assert any(e["event"] == "router_stopped" for e in logs)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(url + "/health")


async def test_app_serve_without_a_model_says_so(cluster: Cluster) -> None:
    with pytest.raises(RouterStartError, match="router.model is not set"):
        await serve(Config(bus=cluster.bus_config, router=RouterConfig(http_port=0)), asyncio.Event())


def test_app_router_id_is_a_subject_token() -> None:
    assert router_id("r7") == "r7"
    generated = router_id("")
    assert generated.startswith("router-") and all(c.isalnum() or c in "-_" for c in generated)
