"""Shared fixtures: a real nats-server on a free loopback port, and a unique namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvrelay.transport.config import BusConfig
from kvrelay.transport.server import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One real nats-server (JetStream on, own temp store) for the whole session.

    Tests isolate themselves by namespace (``bus_config``), not by server.
    """
    server = NatsServer()
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
    return BusConfig(url=nats_url, namespace=namespace)
