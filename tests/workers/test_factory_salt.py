"""The factory gives every engine the deployment's tenant salt secret (router.tenant_salt_secret),
so workers name blocks exactly as the router does."""

from __future__ import annotations

import pytest

from kvrelay.config import Config
from kvrelay.router.policy_factory import kv_routing
from kvrelay.workers.factory import EngineUnavailable, _build, decode_engine, prefill_engine

PROMPT = list(range(1000, 1100))  # 3 full blocks of 32


def _cfg(secret: str) -> Config:
    return Config.from_mapping({"router": {"tenant_salt_secret": secret},
                                "engine": {"kind": "sim", "block_size": 32, "sim_time_scale": 0.0}})


@pytest.mark.parametrize("build", [prefill_engine, decode_engine])
def test_factory_salt_sim_engines_hash_like_the_router(build) -> None:
    cfg = _cfg("s3cret")
    _, router_hash, _ = kv_routing(cfg)
    engine = build(cfg, "w1")
    assert engine.salt_secret == "s3cret"
    assert engine.hashes(PROMPT, "acme") == router_hash(PROMPT, "acme")
    assert engine.hashes(PROMPT, "acme") != engine.hashes(PROMPT, "globex")  # tenants never share
    no_secret = build(_cfg(""), "w1")
    assert no_secret.hashes(PROMPT, "acme") != engine.hashes(PROMPT, "acme")  # the secret is in it


@pytest.mark.parametrize("build", [prefill_engine, decode_engine])
def test_factory_salt_without_a_secret_tenants_still_never_share_hashes(build) -> None:
    cfg = _cfg("")
    _, router_hash, _ = kv_routing(cfg)
    engine = build(cfg, "w1")
    assert engine.hashes(PROMPT, "acme") == router_hash(PROMPT, "acme")
    assert not set(router_hash(PROMPT, "acme")) & set(router_hash(PROMPT, "globex"))


def test_factory_salt_is_set_on_engines_that_read_it_as_an_attribute() -> None:
    class Attr:  # like the vLLM engines: KvEventsMixin.salt_secret, read when events start
        salt_secret = ""

        def __init__(self, engine_cfg, role_cfg) -> None:
            pass

    class Blind:
        def __init__(self, engine_cfg, role_cfg) -> None:
            pass

    assert _build(Attr, None, None, "w", "k").salt_secret == "k"
    assert _build(Blind, None, None, "w", "").__class__ is Blind  # no secret: nothing asked of it
    with pytest.raises(EngineUnavailable, match="cannot salt"):
        _build(Blind, None, None, "w", "k")


def test_factory_salt_reaches_the_vllm_engines() -> None:
    cfg = Config.from_mapping({"router": {"tenant_salt_secret": "k2"},
                               "engine": {"kind": "vllm", "model": "/nonexistent-model-folder"}})
    assert decode_engine(cfg, "d1").salt_secret == "k2"  # constructing starts nothing
    assert prefill_engine(cfg, "p1").salt_secret == "k2"
