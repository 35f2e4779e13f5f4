"""Shared fixtures: a real nats-server on a free loopback port, and a unique namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvrelay.transport.config import BusConfig, StreamLimits
from kvrelay.transport.server import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One real nats-server (JetStream on, own temp store) for the whole session.

    Tests isolate themselves by namespace (``bus_config``), not by server.
    """
    server = NatsServer(max_memory_store=4 << 30)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def bus_config(nats_url: str, namespace: str) -> BusConfig:
    """Small in-memory streams (JetStream reserves max_bytes per stream up front, and the session's
    server hosts every test's namespace) and a request timeout that holds on a loaded 2-core box."""
    small = StreamLimits(max_msgs=1000, max_bytes=8 << 20, max_age_s=120.0, storage="memory")
    return BusConfig(url=nats_url, namespace=namespace, request_timeout_s=10.0, requests=small, prefilled=small,
                     kv_events=small.replace(discard="old"))
