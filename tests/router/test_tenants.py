"""Tenants at the router: API keys, the tenants file (reloaded), and per-tenant quotas (pure)."""

from __future__ import annotations

import json
import os

import pytest

from kvrelay.router.errors import ContextTooLong, PermissionDenied, QuotaExceeded, Unauthorized
from kvrelay.router.metrics import RouterMetrics
from kvrelay.router.tenants import Quotas, Tenants
from kvrelay.schemas.errors import ValidationError
from kvrelay.schemas.tenants import TenantsConfig, TenantsError, TenantSpec, hash_api_key, load_tenants
from kvrelay.tenants_cli import add_tenant


def _file(tmp_path, tenants: list[dict]) -> str:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


def test_tenants_http_key_names_the_tenant(tmp_path) -> None:
    t = Tenants(_file(tmp_path, [{"name": "a", "api_keys": [hash_api_key("ka")]},
                                 {"name": "b", "api_keys": [hash_api_key("kb")]}]))
    assert t.from_http("Bearer ka", None).name == "a"
    assert t.from_http("bearer kb", "b").name == "b"
    with pytest.raises(Unauthorized):
        t.from_http(None, None)
    with pytest.raises(Unauthorized):
        t.from_http("Bearer nope", None)
    with pytest.raises(Unauthorized):
        t.from_http("Basic ka", None)
    with pytest.raises(PermissionDenied):
        t.from_http("Bearer ka", "b")


def test_tenants_subject_tenant_must_be_configured(tmp_path) -> None:
    t = Tenants(_file(tmp_path, [{"name": "a"}]))
    assert t.from_subject("a").name == "a"
    with pytest.raises(PermissionDenied):
        t.from_subject("z")


def test_tenants_weights_and_metric_labels_for_fair_admission(tmp_path) -> None:
    t = Tenants(_file(tmp_path, [{"name": "a", "weight": 2.5}, {"name": "b"}]))
    assert [t.weight("a"), t.weight("b"), t.weight("zz")] == [2.5, 1.0, 1.0]
    assert [t.label("a"), t.label("zz")] == ["a", "open"]  # labels bounded by the config
    open_ = Tenants("")
    assert open_.weight("anyone") == 1.0 and open_.label("anyone") == "open"


def test_tenants_reload_takes_a_changed_file_and_keeps_the_last_good_one(tmp_path) -> None:
    path = _file(tmp_path, [{"name": "a", "api_keys": [hash_api_key("ka")]}])
    t = Tenants(path)
    assert not t.reload()  # unchanged
    _write(path, {"tenants": [{"name": "a", "api_keys": [hash_api_key("new")]}]}, bump=1)
    assert t.reload() and t.from_http("Bearer new", None).name == "a"
    _write(path, {"tenants": [{"name": "a", "bogus": 1}]}, bump=2)
    assert not t.reload()
    assert t.from_http("Bearer new", None).name == "a"


def _write(path: str, data: dict, bump: int) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + bump))


def test_tenants_file_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(TenantsError, match="bogus"):
        load_tenants(_file(tmp_path, [{"name": "a", "bogus": 1}]))
    with pytest.raises(TenantsError, match="unique"):
        load_tenants(_file(tmp_path, [{"name": "a"}, {"name": "a"}]))
    with pytest.raises(ValidationError):
        TenantSpec(name="a b")
    with pytest.raises(ValidationError):
        TenantSpec(name="a", api_keys=["plain-key"])
    with pytest.raises(ValidationError):
        TenantSpec(name="a", nats_password="plain-password")


def test_tenants_add_stores_only_hashes(tmp_path) -> None:
    path = tmp_path / "t.json"
    key, password = add_tenant(path, "acme", max_inflight=3)
    text = path.read_text()
    assert key not in text and password not in text
    cfg = load_tenants(path)
    assert cfg.by_key(key).name == "acme" and cfg.get("acme").max_inflight == 3
    import bcrypt

    assert bcrypt.checkpw(password.encode(), cfg.get("acme").nats_password.encode())
    key2, _ = add_tenant(path, "beta")
    assert load_tenants(path).by_key(key2).name == "beta"


def test_quotas_in_flight_limit_and_release() -> None:
    spec, q = TenantSpec(name="a", max_inflight=2), Quotas()
    q.admit(spec, 10, now=0.0)
    q.admit(spec, 10, now=0.0)
    with pytest.raises(QuotaExceeded) as info:
        q.admit(spec, 10, now=0.0)
    assert info.value.code == "tenant_max_inflight" and info.value.status == 429
    q.release(spec, 10, 10, now=0.5)
    q.admit(spec, 10, now=0.5)
    assert q.inflight("a") == 2 and q.inflight("other") == 0


def test_quotas_tokens_per_minute_slide_and_say_when_to_retry() -> None:
    spec, q = TenantSpec(name="a", tokens_per_minute=100), Quotas()
    q.admit(spec, 60, now=0.0)
    q.release(spec, 60, 60, now=1.0)
    q.admit(spec, 30, now=10.0)
    q.release(spec, 30, 30, now=11.0)
    with pytest.raises(QuotaExceeded) as info:
        q.admit(spec, 20, now=20.0)  # 90 used in the last minute
    assert info.value.code == "tenant_tokens_per_minute"
    assert info.value.retry_after_s == 40  # the 60 of second 0 leave the window at second 60
    q.admit(spec, 20, now=60.5)


def test_quotas_unused_tokens_are_given_back() -> None:
    spec, q = TenantSpec(name="a", tokens_per_minute=100), Quotas()
    q.admit(spec, 90, now=0.0)
    q.release(spec, 90, 30, now=1.0)  # asked 90, used 30
    q.admit(spec, 70, now=2.0)


def test_tenants_admit_checks_the_context_cap_and_counts(tmp_path) -> None:
    t = Tenants(_file(tmp_path, [{"name": "a", "max_context": 100}]))
    metrics = RouterMetrics()
    spec = t.from_subject("a")
    assert t.admit(spec, 60, 40, metrics) == 100
    with pytest.raises(ContextTooLong):
        t.admit(spec, 60, 41, metrics)
    assert metrics.tenant_tokens.labels("a", "prompt")._value.get() == 60


def test_tenants_config_by_key_is_none_for_an_unknown_key() -> None:
    cfg = TenantsConfig(tenants=[TenantSpec(name="a", api_keys=[hash_api_key("k")])])
    assert cfg.by_key("k").name == "a" and cfg.by_key("x") is None
