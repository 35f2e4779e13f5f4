"""`kvrelay up --tenants FILE`: HTTP needs a tenant's API key; on the bus nats-server itself holds each
tenant to its own subjects (the authorization kvrelay generates), and the services use identities
of their own whose passwords sit in 0600 files of the run folder."""

from __future__ import annotations

import asyncio

import httpx
import nats
import pytest

from kvrelay.schemas import ClientRequest, SamplingSpec, TokenChunk, pack, unpack
from kvrelay.tenants_cli import add_tenant
from kvrelay.transport.subjects import Subjects

pytestmark = pytest.mark.e2e
S = Subjects("default")


@pytest.fixture(scope="module")
def secured(tmp_path_factory, start_deployment):
    folder = tmp_path_factory.mktemp("tenants")
    path = folder / "tenants.json"
    creds = {name: add_tenant(path, name) for name in ("alice", "bob")}
    creds["carol"] = add_tenant(path, "carol", tokens_per_minute=60)
    dep = start_deployment(folder / "run", "tiny", ["--engine", "sim", "--tenants", str(path)])
    dep.creds = creds
    yield dep
    assert dep.stop() == 0, "".join(dep.output[-40:])


def _chat(dep, key: str | None, headers: dict | None = None, content: str = "Hello there") -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{dep.url}/v1/chat/completions", headers=h, timeout=120,
                      json={"model": "kvrelay-tiny", "max_tokens": 4,
                            "messages": [{"role": "user", "content": content}]})


def test_up_tenants_http_needs_a_known_key(secured) -> None:
    for key in (None, "kvr-not-a-key"):
        r = _chat(secured, key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    r = _chat(secured, secured.creds["alice"][0])
    assert r.status_code == 200, r.text


def test_up_tenants_a_key_cannot_claim_another_tenant(secured) -> None:
    r = _chat(secured, secured.creds["alice"][0], {"X-Kvrelay-Tenant": "bob"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_up_tenants_quota_answers_429_naming_the_limit(secured) -> None:
    carol = secured.creds["carol"][0]
    first = _chat(secured, carol)  # ~30 prompt tokens + 4
    assert first.status_code == 200, first.text
    over = _chat(secured, carol)
    assert over.status_code == 429 and over.json()["error"]["code"] == "tenant_tokens_per_minute"
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert _chat(secured, secured.creds["alice"][0]).status_code == 200  # other tenants unaffected


def test_up_tenants_service_secrets_are_private(secured) -> None:
    files = sorted((secured.run_dir / "secrets").iterdir())
    assert [f.name for f in files] == ["decode.password", "prefill.password", "router.password"]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)


async def test_up_tenants_nats_tenant_streams_its_own_request(secured) -> None:
    alice_pw = secured.creds["alice"][1]
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(str(exc).lower())

    nc = await nats.connect(secured.nats_url, user="alice", password=alice_pw, inbox_prefix=S.inbox_prefix("alice"),
                            error_cb=on_error, allow_reconnect=False)
    try:
        inbox = f"{S.client('alice')}.run1"
        sub = await nc.subscribe(inbox)
        req = ClientRequest(request_id="alice-1", stream_subject=inbox, model="kvrelay-tiny", prompt="Once upon",
                            sampling=SamplingSpec(max_tokens=4, temperature=0.0))
        ack = await nc.jetstream().publish(S.request("alice"), pack(req), timeout=10)
        assert ack.seq >= 1
        chunks: list[TokenChunk] = []
        while not chunks or chunks[-1].finish_reason is None:
            chunks.append(unpack((await sub.next_msg(timeout=60)).data, TokenChunk))
        assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].error is None
        # and everything else in kvrelay's space is closed to it, by the server
        await nc.subscribe("kvrelay.>")
        assert "permissions violation" in await asyncio.wait_for(errors.get(), 10)
        await nc.publish(S.request("bob"), pack(req))
        assert "permissions violation" in await asyncio.wait_for(errors.get(), 10)
    finally:
        await nc.close()


async def test_up_tenants_nats_refuses_strangers(secured) -> None:
    for user, pw in ((None, None), ("alice", "wrong"), ("bob", secured.creds["alice"][1])):
        with pytest.raises(Exception) as info:
            await nats.connect(secured.nats_url, user=user, password=pw, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=5)
        assert "authorization" in str(info.value).lower() or "no servers" in str(info.value).lower()


def test_up_tenants_share_no_cache(secured) -> None:
    """The same prompt from another tenant is no prefix-cache hit: block hashes are salted per tenant."""
    text = "A long shared preamble about caching. " * 40
    alice, bob = secured.creds["alice"][0], secured.creds["bob"][0]
    assert _chat(secured, alice, content=text).status_code == 200
    again = _chat(secured, alice, content=text).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    other = _chat(secured, bob, content=text).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert again > 0 and other == 0, (again, other)
