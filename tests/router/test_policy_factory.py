"""Policies by name, and the seam by which a policy asks for block hashes."""

from __future__ import annotations

import pytest

from kvrelay.router.policy import LeastLoaded, RoundRobin
from kvrelay.router.policy_factory import PolicyError, make_policy, needs_hashes


def test_policy_factory_builds_each_named_policy() -> None:
    assert isinstance(make_policy("least_loaded", seed=1), LeastLoaded)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    kv = make_policy("kv_aware")
    assert kv.name == "kv_aware"


def test_policy_factory_rejects_unknown_names_and_options() -> None:
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(PolicyError, match="does not take"):
        make_policy("round_robin", seed=1)


def test_policy_factory_needs_hashes_only_when_the_policy_says_so() -> None:
    assert not needs_hashes(make_policy("least_loaded"))

    class Hungry(RoundRobin):
        needs_hashes = True

    assert needs_hashes(Hungry())
