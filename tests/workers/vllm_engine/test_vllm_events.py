"""vLLM KV events -> kvrelay hashes (pure translator), on vLLM's own event classes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvrelay.schemas.hashing import HashSpec, tenant_salt
from kvrelay.workers.vllm_engine.vllm_events import KvHashTranslator, _tenant_of, cache_salt

kv = pytest.importorskip("vllm.distributed.kv_events")

BS = 32
SPEC = HashSpec(BS)
SECRET = "s3cret"


class Sink:
    def __init__(self) -> None:
        self.refs: Counter[int] = Counter()
        self.parents: list[int | None] = []

    def stored(self, hashes, parent=None, num_tokens=0) -> None:
        self.refs.update(hashes)
        self.parents.append(parent)

    def removed(self, hashes) -> None:
        self.refs.subtract(hashes)
        self.refs = +self.refs

    def cleared(self) -> None:
        self.refs.clear()


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 50_000) for _ in range(n)]


def _stored(vh: list[int], tokens: list[int], parent: int | None = None, salt: str | None = None):
    extra = [(salt,) if salt and i == 0 and parent is None else None for i in range(len(vh))]
    return kv.BlockStored(block_hashes=vh, parent_block_hash=parent, token_ids=tokens, block_size=BS,
                          lora_id=None, medium="GPU", lora_name=None,
                          extra_keys=extra if any(extra) else None, group_idx=0)


def _router_hashes(tokens: list[int], tenant: str) -> list[int]:
    return SPEC.hashes(tokens, tenant_salt(SECRET, tenant))


def test_translator_stored_matches_router_hashes_across_parent_events() -> None:
    sink = Sink()
    tr = KvHashTranslator(SPEC, SECRET, sink=sink)
    prompt = _tokens(1, 5 * BS)
    tr.apply(_stored([101, 102, 103], prompt[:3 * BS], salt=cache_salt("acme")))
    tr.apply(_stored([104, 105], prompt[3 * BS:], parent=103))  # decode crosses into new blocks
    want = _router_hashes(prompt, "acme")
    assert sorted(tr.held()) == sorted(want)
    assert sink.refs == Counter(want)
    assert sink.parents == [None, want[2]]


def test_translator_tenants_get_different_roots() -> None:
    tr = KvHashTranslator(SPEC, SECRET)
    prompt = _tokens(2, 2 * BS)
    tr.apply(_stored([1, 2], prompt, salt="a"))
    tr.apply(_stored([3, 4], prompt, salt="b"))
    assert tr.ours(2) == _router_hashes(prompt, "a")[1]
    assert tr.ours(4) == _router_hashes(prompt, "b")[1]
    assert tr.ours(2) != tr.ours(4)


def test_translator_no_secret_still_salts_by_tenant_like_the_router() -> None:
    tr = KvHashTranslator(SPEC, "")
    prompt = _tokens(3, BS)
    tr.apply(_stored([9], prompt, salt="anyone"))
    tr.apply(_stored([10], prompt, salt="other"))
    assert tr.held() == SPEC.hashes(prompt, tenant_salt("", "anyone")) + SPEC.hashes(prompt, tenant_salt("", "other"))
    assert not set(SPEC.hashes(prompt, tenant_salt("", "anyone"))) & set(SPEC.hashes(prompt))


def test_translator_refcounts_double_store_and_remove() -> None:
    sink = Sink()
    tr = KvHashTranslator(SPEC, SECRET, sink=sink)
    prompt = _tokens(4, BS)
    ev = _stored([7], prompt, salt="t")
    tr.apply(ev)
    tr.apply(ev)
    h = _router_hashes(prompt, "t")[0]
    assert tr.held() == [h, h]
    tr.apply(kv.BlockRemoved(block_hashes=[7], medium="GPU"))
    assert tr.held() == [h] and sink.refs == Counter({h: 1})
    tr.apply(kv.BlockRemoved(block_hashes=[7], medium="GPU"))
    tr.apply(kv.BlockRemoved(block_hashes=[7], medium="GPU"))  # one too many: counted, ignored
    assert tr.held() == [] and not sink.refs
    assert tr.counters["unknown_removed"] == 1


def test_translator_unknown_parent_is_dropped_and_counted() -> None:
    sink = Sink()
    tr = KvHashTranslator(SPEC, SECRET, sink=sink)
    tr.apply(_stored([5], _tokens(5, BS), parent=999))
    assert tr.held() == [] and not sink.refs and tr.counters["unknown_parent"] == 1


def test_translator_bad_block_size_is_rejected() -> None:
    tr = KvHashTranslator(SPEC, SECRET)
    tr.apply(_stored([5, 6], _tokens(6, BS)))  # two hashes, one block of tokens
    assert tr.held() == [] and tr.counters["bad_events"] == 1


def test_translator_full_map_evicts_oldest_and_reports_it() -> None:
    sink = Sink()
    tr = KvHashTranslator(SPEC, SECRET, max_blocks=2, sink=sink)
    prompt = _tokens(7, 3 * BS)
    tr.apply(_stored([1, 2, 3], prompt, salt="t"))
    want = _router_hashes(prompt, "t")
    assert sorted(tr.held()) == sorted(want[1:]) and sink.refs == Counter(want[1:])
    assert tr.counters["evicted"] == 1


def test_translator_all_blocks_cleared_empties_map() -> None:
    sink = Sink()
    tr = KvHashTranslator(SPEC, SECRET, sink=sink)
    tr.apply(_stored([1], _tokens(8, BS), salt="t"))
    tr.apply(kv.AllBlocksCleared())
    assert tr.held() == [] and not sink.refs


def test_translator_ignores_other_kv_cache_groups() -> None:
    tr = KvHashTranslator(SPEC, SECRET)
    ev = _stored([1], _tokens(9, BS), salt="t")
    ev.group_idx = 1
    tr.apply(ev)
    assert tr.held() == [] and tr.counters["other_groups"] == 1


def test_tenant_of_reads_last_string_of_first_block() -> None:
    assert _tenant_of(None) == ""
    assert _tenant_of([("lora-x", "acme"), None]) == "acme"
    assert _tenant_of(["acme"]) == "acme"
    assert cache_salt("") is None and cache_salt("acme") == "acme"
