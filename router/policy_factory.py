"""Routing policies by name: ``least_loaded``, ``round_robin`` and ``kv_aware``.

``kv_aware`` lives in ``router/kv_policy.py`` and is imported only when asked for. A policy
that routes by prefix overlap says so with a true ``needs_hashes`` attribute; the dispatcher
then computes the prompt's block hashes for it (and only then).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from kvrelay.base.logs import get_logger
from kvrelay.router.config import RouterConfig
from kvrelay.router.policy import LeastLoaded, Policy, RoundRobin
from kvrelay.schemas.hashing import CacheConfig

log = get_logger(__name__)

NAMES = ("least_loaded", "round_robin", "kv_aware")


class PolicyError(ValueError):
    """An unknown policy name, options it does not take, or a policy that cannot be loaded."""


def make_policy(name: str, **options: Any) -> Policy:
    """A new policy instance; ``options`` go to its constructor (e.g. ``seed=1``)."""
    if name == "least_loaded":
        cls: Any = LeastLoaded
    elif name == "round_robin":
        cls = RoundRobin
    elif name == "kv_aware":
        try:
            cls = importlib.import_module("kvrelay.router.kv_policy").KvAware
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"policy 'kv_aware' is not available: {exc}") from exc
    else:
        raise PolicyError(f"unknown policy {name!r}: choose one of {', '.join(NAMES)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise PolicyError(f"policy {name!r} does not take options {sorted(options)}: {exc}") from exc


def needs_hashes(policy: Policy) -> bool:
    """Whether ``policy`` wants ``RouteRequest.block_hashes`` filled in."""
    return bool(getattr(policy, "needs_hashes", False))


def kv_routing(rc: RouterConfig, cache: CacheConfig) -> tuple[Policy, Callable[[Sequence[int], str], list[int]], Any]:
    """The ``kv_aware`` policy wired from the router's section: ``(policy, hasher, prefix index)``.

    Block hashes follow the deployment's cache contract (block size, hash seed, tenant salt secret),
    exactly as the workers hash theirs. The caller feeds the index with ``router.events.KvEventsSubscriber``.
    """
    from kvrelay.router.index import PrefixIndex
    from kvrelay.router.pd_decider import PdDecider

    spec = cache.spec
    index = PrefixIndex(spec.fingerprint, max_blocks=rc.kv_index_max_blocks, max_workers=rc.kv_index_max_workers)
    if index.impl == "native":
        log.info("kv_index", impl=index.impl, max_blocks=index.max_blocks)
    else:
        log.warning("kv_index", impl=index.impl, max_blocks=index.max_blocks,
                    hint="the C storage (kvrelay.router._holders) is not built: "
                         "reinstall kvrelay with a C compiler")
    policy = make_policy("kv_aware", index=index, block_size=spec.block_size, w_prefill=rc.kv_w_prefill,
                         w_queue=rc.kv_w_queue, w_decode=rc.kv_w_decode, temperature=rc.kv_temperature,
                         max_fallbacks=rc.kv_max_fallbacks, local_threshold_tokens=rc.kv_local_threshold_tokens,
                         pd=PdDecider.from_config(rc))
    def hasher(token_ids: Sequence[int], tenant: str) -> list[int]:
        return spec.hashes(token_ids, cache.salt(tenant))

    return policy, hasher, index
