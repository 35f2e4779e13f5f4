"""The simulated engine: real block manager, KV events and (small) KV bytes; timing from a cost model.

``workers.factory`` builds ``SimPrefillEngine(engine_cfg, prefill_cfg)`` and
``SimDecodeEngine(engine_cfg, decode_cfg)`` for ``engine.kind = "sim"``.
"""

from kvrelay.workers.sim.blocks import BadAllocation, BlockManager, BlockManagerError, BlocksFull
from kvrelay.workers.sim.cost import PRESETS, CostModel, UnknownPreset
from kvrelay.workers.sim.decode import SimDecodeEngine
from kvrelay.workers.sim.engine import SimPrefillEngine, sim_tokens

__all__ = [
    "PRESETS", "BadAllocation", "BlockManager", "BlockManagerError", "BlocksFull", "CostModel",
    "SimDecodeEngine", "SimPrefillEngine", "UnknownPreset", "sim_tokens",
]
