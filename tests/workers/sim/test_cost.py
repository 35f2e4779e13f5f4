"""The cost model's mixed forward (``CostModel.forward_s``) against its single-kind terms."""

from __future__ import annotations

import pytest

from kvrelay.workers.sim.cost import PRESETS, CostModel

COST = CostModel(name="t", prefill_tokens_per_s=1000.0, prefill_fixed_s=0.01, prefill_attn_s=1e-6,
                 decode_fixed_s=0.02, decode_per_seq_s=0.001, kv_bytes_per_token=10, transfer_bytes_per_s=1e6)


@pytest.mark.parametrize("cost", [COST, *PRESETS.values()], ids=lambda c: c.name)
def test_forward_of_one_kind_is_that_kinds_cost(cost: CostModel) -> None:
    assert cost.forward_s(8, []) == cost.decode_step_s(8)
    assert cost.forward_s(0, [(500, 200)]) == pytest.approx(cost.prefill_s(500, 200))
    assert cost.forward_s(0, []) == 0.0


def test_forward_pays_one_fixed_cost_for_decodes_and_chunks_together() -> None:
    chunks = [(100, 0), (50, 300)]
    compute = 150 / 1000.0 + 1e-6 * (100 * 50 + 50 * 325)
    assert COST.forward_s(4, chunks) == pytest.approx(compute + COST.decode_step_s(4))
    assert COST.forward_s(0, chunks) == pytest.approx(compute + 0.01)
    separate = COST.prefill_s(100) + COST.prefill_s(50, 300) + COST.decode_step_s(4)
    assert COST.forward_s(4, chunks) < separate


@pytest.mark.parametrize("batch, chunks", [(-1, []), (0, [(-1, 0)]), (1, [(5, -2)])])
def test_forward_refuses_negative_counts(batch: int, chunks: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        COST.forward_s(batch, chunks)
