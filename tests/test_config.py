"""The root config: sections validated, unknown keys rejected by name, overrides applied."""

from __future__ import annotations

import json

import pytest

from kvrelay.config import Config, ConfigError, apply_override, load


def test_config_defaults_are_valid() -> None:
    cfg = load()
    assert isinstance(cfg, Config)
    assert cfg.bus.prefilled.discard == "new"
    assert cfg.cache.block_size % 32 == 0


def test_config_file_and_overrides_compose(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"router": {"max_inflight": 5}, "decode": {"max_slots": 2}}))
    cfg = load(str(path), ["router.max_inflight=7", "bus.namespace=ns1"], {"decode": {"fetch_batch": 1}})
    assert cfg.router.max_inflight == 7
    assert cfg.decode.max_slots == 2 and cfg.decode.fetch_batch == 1
    assert cfg.bus.namespace == "ns1"


@pytest.mark.parametrize(
    "override, needle",
    [
        pytest.param("router.max_inflihgt=3", "max_inflihgt", id="typo_key"),
        pytest.param("routr.max_inflight=3", "routr", id="typo_section"),
        pytest.param("router.max_inflight=-1", "max_inflight", id="out_of_range"),
        pytest.param("router.max_inflight=\"x\"", "max_inflight", id="wrong_type"),
        pytest.param("bus.url=http://x", "bus.url", id="bad_url"),
        pytest.param("prefill.backends=[\"smoke-signals\"]", "backends", id="bad_backend"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(None, [override])


def test_config_override_syntax_errors() -> None:
    with pytest.raises(ConfigError):
        apply_override({}, "no_equals_sign")
    with pytest.raises(ConfigError):
        load("/nonexistent/kvrelay.json")
