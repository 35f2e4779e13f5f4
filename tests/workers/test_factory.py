"""The engine factory: builds the configured kind lazily, hands every engine the deployment's cache
contract, and says clearly when it cannot."""

from __future__ import annotations

import pytest

from kvrelay.router.policy_factory import kv_routing
from kvrelay.router.config import RouterConfig
from kvrelay.schemas.hashing import CacheConfig
from kvrelay.workers import factory
from kvrelay.workers.config import WorkerProcessConfig
from kvrelay.workers.factory import EngineUnavailable, decode_engine, prefill_engine

PROMPT = list(range(1000, 1100))  # 3 full blocks of 32


class _Built:
    def __init__(self, engine_cfg, role_cfg, cache, *, worker_id: str = "") -> None:
        self.args = (engine_cfg, role_cfg, cache, worker_id)


def _cfg(secret: str = "", kind: str = "sim", **engine) -> WorkerProcessConfig:
    return WorkerProcessConfig.from_mapping({"cache": {"tenant_salt_secret": secret, "block_size": 32},
                                      "engine": {"kind": kind, "sim_time_scale": 0.0, **engine}})


def test_factory_builds_both_roles_with_their_sections_and_the_contract(monkeypatch) -> None:
    monkeypatch.setitem(factory.ENGINES, "sim", lambda: (_Built, _Built))
    cfg = _cfg("k")
    assert prefill_engine(cfg, "p9").args == (cfg.engine, cfg.prefill, cfg.cache, "p9")
    assert decode_engine(cfg, "d9").args == (cfg.engine, cfg.decode, cfg.cache, "d9")


def test_factory_an_engine_that_cannot_be_imported_is_a_clear_error(monkeypatch) -> None:
    def broken() -> tuple[type, type]:
        raise ImportError("No module named 'kvrelay.workers.no_such_engine'")

    monkeypatch.setitem(factory.ENGINES, "sim", broken)
    with pytest.raises(EngineUnavailable, match="engine 'sim' cannot be imported here: No module"):
        prefill_engine(_cfg())


def test_factory_an_unknown_kind_names_the_known_ones() -> None:
    cfg = _cfg().replace(engine=_cfg().engine.replace(kind="tpu"))
    with pytest.raises(EngineUnavailable, match=r"unknown engine kind 'tpu' \(expected one of \['sim', 'vllm'\]\)"):
        decode_engine(cfg)


@pytest.mark.parametrize("build", [prefill_engine, decode_engine])
def test_factory_sim_engines_hash_like_the_router(build) -> None:
    cfg = _cfg("s3cret")
    _, router_hash, _ = kv_routing(RouterConfig(), cfg.cache)
    engine = build(cfg, "w1")
    assert engine.hashes(PROMPT, "acme") == router_hash(PROMPT, "acme")
    assert engine.hashes(PROMPT, "acme") != engine.hashes(PROMPT, "globex")  # tenants never share
    no_secret = build(_cfg(""), "w1")
    assert no_secret.hashes(PROMPT, "acme") != engine.hashes(PROMPT, "acme")  # the secret is in it


@pytest.mark.parametrize("build", [prefill_engine, decode_engine])
def test_factory_without_a_secret_tenants_still_never_share_hashes(build) -> None:
    cfg = _cfg("")
    _, router_hash, _ = kv_routing(RouterConfig(), cfg.cache)
    engine = build(cfg, "w1")
    assert engine.hashes(PROMPT, "acme") == router_hash(PROMPT, "acme")
    assert not set(router_hash(PROMPT, "acme")) & set(router_hash(PROMPT, "globex"))


def test_factory_the_contract_reaches_the_vllm_engines() -> None:
    cfg = _cfg("k2", kind="vllm", model="/nonexistent-model-folder")
    decode, prefill = decode_engine(cfg, "d1"), prefill_engine(cfg, "p1")  # constructing starts nothing
    assert decode.cache == prefill.cache == CacheConfig(block_size=32, tenant_salt_secret="k2")
    assert decode.info.block_size == prefill.info.block_size == 32
