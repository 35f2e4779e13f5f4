"""CPU lists and thread binding (decode.kv_load_cpus: where the KV loader threads run)."""

from __future__ import annotations

import os

import pytest

from kvrelay.schemas.errors import ValidationError
from kvrelay.workers import cpus
from kvrelay.workers.config import DecodeConfig


@pytest.mark.parametrize(("text", "expected"), [("", set()), ("0", {0}), ("0-3", {0, 1, 2, 3}),
                                                ("1,3-4", {1, 3, 4}), (" 2 , 2 ", {2})])
def test_cpus_parse_cpu_list(text: str, expected: set[int]) -> None:
    assert cpus.parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "-1", "0-5000", "1.5"])
def test_cpus_parse_cpu_list_rejects_bad_lists_naming_the_key(text: str) -> None:
    with pytest.raises(ValidationError, match="decode.kv_load_cpus"):
        cpus.parse_cpu_list(text, "decode.kv_load_cpus")


def test_cpus_decode_config_rejects_a_bad_kv_load_cpus() -> None:
    assert DecodeConfig.from_mapping({"kv_load_cpus": "0-1"}).kv_load_cpus == "0-1"
    with pytest.raises(ValidationError, match="kv_load_cpus"):
        DecodeConfig.from_mapping({"kv_load_cpus": "one"})


def test_cpus_pool_threads_bind_themselves_and_nothing_else() -> None:
    mine = os.sched_getaffinity(0)
    core = max(mine)
    with cpus.pool(2, "test-load", frozenset({core})) as p:
        seen = [p.submit(os.sched_getaffinity, 0).result(timeout=10) for _ in range(4)]
    assert seen == [{core}] * 4
    assert os.sched_getaffinity(0) == mine  # the caller's thread is untouched


def test_cpus_pool_without_cpus_leaves_threads_where_they_were() -> None:
    mine = os.sched_getaffinity(0)
    with cpus.pool(1, "test-load") as p:
        assert p.submit(os.sched_getaffinity, 0).result(timeout=10) == mine


def test_cpus_bind_refused_is_logged_and_harmless() -> None:
    mine = os.sched_getaffinity(0)
    with cpus.pool(1, "test-load", frozenset({cpus.MAX_CPU})) as p:  # no such core here
        assert p.submit(os.sched_getaffinity, 0).result(timeout=10) == mine
