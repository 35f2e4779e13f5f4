"""Tenants on a real nats-server with the authorization kvrelay generates: nats-server, not kvrelay
code, keeps a tenant to its own subjects; every violation reaches the client as an error."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import bcrypt
import nats
import pytest

from kvrelay.schemas.tenants import TenantsConfig, TenantSpec
from kvrelay.transport.auth import authorization, make_service_secrets, render
from kvrelay.transport.server import NatsServer
from kvrelay.transport.subjects import Subjects

S = Subjects("default")
PASSWORDS = {"alice": secrets.token_urlsafe(16), "bob": secrets.token_urlsafe(16)}


def _hash(pw: str) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4, prefix=b"2a")).decode()


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[tuple[NatsServer, dict[str, str]]]:
    tenants = TenantsConfig(tenants=[TenantSpec(name=n, nats_password=_hash(pw)) for n, pw in PASSWORDS.items()])
    services = make_service_secrets(tmp_path_factory.mktemp("secrets"))
    server = NatsServer(authorization=render(authorization(tenants, S, services)))
    server.start()
    yield server, services
    server.stop()


class Client:
    """A tenant's connection that records the errors the server sends it."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.nc: nats.NATS | None = None

    async def connect(self, url: str, user: str, password: str, inbox: str | None = None) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.put_nowait(str(exc))

        self.nc = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False,
                                     inbox_prefix=inbox or S.inbox_prefix(user))
        return self

    async def violation(self, timeout: float = 10.0) -> str:
        err = await asyncio.wait_for(self.errors.get(), timeout)
        assert "permissions violation" in err.lower(), err
        return err


@pytest.fixture
async def alice(secured) -> AsyncIterator[Client]:
    client = await Client().connect(secured[0].url, "alice", PASSWORDS["alice"])
    yield client
    await client.nc.close()


@pytest.fixture
async def service(secured) -> AsyncIterator[nats.NATS]:
    server, services = secured
    nc = await nats.connect(server.url, user="router", password=services["router"], allow_reconnect=False)
    yield nc
    await nc.close()


@pytest.mark.parametrize("subject", [f"{S.client('bob')}.out", "kvrelay.>", ">", f"{S.root}.tokens.r1",
                                     "_INBOX_bob.>", "_INBOX.>", f"{S.root}.prefilled"])
async def test_auth_tenant_cannot_subscribe_outside_its_space(alice: Client, subject: str) -> None:
    await alice.nc.subscribe(subject)
    assert subject.lower() in await alice.violation()  # nats-py lowercases the server's message


@pytest.mark.parametrize("subject", [f"{S.root}.prefill.w1", f"{S.root}.req.bob", f"{S.root}.cancel.bob.r1",
                                     f"{S.root}.tokens.r1", f"{S.root}.kv.release.w1", "$JS.API.STREAM.LIST"])
async def test_auth_tenant_cannot_publish_outside_its_space(alice: Client, subject: str) -> None:
    await alice.nc.publish(subject, b"x")
    assert subject.lower() in await alice.violation()


async def test_auth_tenant_receives_its_own_stream_and_not_anothers(alice: Client, service: nats.NATS) -> None:
    mine = await alice.nc.subscribe(f"{S.client('alice')}.>")
    await alice.nc.flush()  # the subscription is on the server before the service publishes
    await service.publish(f"{S.client('bob')}.out", b"for bob")
    await service.publish(f"{S.client('alice')}.out", b"for alice")
    msg = await mine.next_msg(timeout=10)
    assert msg.data == b"for alice" and msg.subject == f"{S.client('alice')}.out"
    assert alice.errors.empty()


async def test_auth_tenant_may_publish_its_requests_and_cancels_and_get_replies(alice: Client,
                                                                                 service: nats.NATS) -> None:
    got = await service.subscribe(f"{S.root}.>")
    await service.flush()  # the subscription is on the server before alice publishes
    await alice.nc.publish(S.request("alice"), b"req")
    await alice.nc.publish(S.cancel("alice", "r1"), b"cancel")
    await alice.nc.flush()
    subjects = {(await got.next_msg(timeout=10)).subject for _ in range(2)}
    assert subjects == {S.request("alice"), S.cancel("alice", "r1")}
    # request/reply through its own inbox (as a JetStream publish ack comes back)
    async def ack(msg) -> None:
        await msg.respond(b"ack")

    await got.unsubscribe()
    responder = await service.subscribe(S.request("alice"), cb=ack)
    await service.flush()
    reply = await alice.nc.request(S.request("alice"), b"ping", timeout=10)
    assert reply.data == b"ack" and alice.errors.empty()
    await responder.unsubscribe()


async def test_auth_wrong_password_or_unknown_user_is_refused(secured) -> None:
    url = secured[0].url
    for user, pw in (("alice", "wrong"), ("mallory", "x"), ("", "")):
        with pytest.raises(Exception) as info:  # nats-py raises its auth error (or gives up connecting)
            await nats.connect(url, user=user or None, password=pw or None, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=5)
        assert "authorization" in str(info.value).lower() or "no servers" in str(info.value).lower()


def test_auth_service_secrets_are_private_files(tmp_path) -> None:
    services = make_service_secrets(tmp_path)
    assert set(services) == {"router", "prefill", "decode"}
    for name, pw in services.items():
        path = tmp_path / f"{name}.password"
        assert path.read_text() == pw and (path.stat().st_mode & 0o777) == 0o600
    assert len(set(services.values())) == 3
