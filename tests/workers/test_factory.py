"""The engine factory: builds the configured kind lazily and says clearly when it cannot."""

from __future__ import annotations

import sys
import types

import pytest

from kvrelay.config import Config
from kvrelay.workers import factory
from kvrelay.workers.factory import EngineUnavailable, decode_engine, prefill_engine


class _Built:
    def __init__(self, engine_cfg, role_cfg) -> None:
        self.args = (engine_cfg, role_cfg)


def test_factory_builds_both_roles_from_the_kinds_module(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("fake_engine_module")
    mod.SimPrefillEngine = _Built
    mod.SimDecodeEngine = _Built
    monkeypatch.setitem(sys.modules, "fake_engine_module", mod)
    monkeypatch.setitem(factory._MODULES, "sim", ("fake_engine_module", "Sim"))
    cfg = Config.from_mapping({"engine": {"kind": "sim"}})
    assert prefill_engine(cfg).args == (cfg.engine, cfg.prefill)
    assert decode_engine(cfg).args == (cfg.engine, cfg.decode)


def test_factory_missing_module_or_class_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.from_mapping({"engine": {"kind": "sim"}})
    monkeypatch.setitem(factory._MODULES, "sim", ("kvrelay.workers.no_such_engine", "Sim"))
    with pytest.raises(EngineUnavailable, match="cannot import kvrelay.workers.no_such_engine"):
        prefill_engine(cfg)
    monkeypatch.setitem(sys.modules, "empty_engine_module", types.ModuleType("empty_engine_module"))
    monkeypatch.setitem(factory._MODULES, "sim", ("empty_engine_module", "Sim"))
    with pytest.raises(EngineUnavailable, match="has no SimDecodeEngine"):
        decode_engine(cfg)


def test_factory_passes_the_worker_id_to_engines_that_take_it(monkeypatch: pytest.MonkeyPatch) -> None:
    class Named:
        def __init__(self, engine_cfg, role_cfg, *, worker_id: str = "") -> None:
            self.worker_id = worker_id

    mod = types.ModuleType("named_engine_module")
    mod.SimPrefillEngine = Named
    mod.SimDecodeEngine = _Built
    monkeypatch.setitem(sys.modules, "named_engine_module", mod)
    monkeypatch.setitem(factory._MODULES, "sim", ("named_engine_module", "Sim"))
    cfg = Config.from_mapping({"engine": {"kind": "sim"}})
    assert prefill_engine(cfg, "p9").worker_id == "p9"
    assert decode_engine(cfg, "d9").args == (cfg.engine, cfg.decode)  # takes no id: not given one
