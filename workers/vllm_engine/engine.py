"""vLLM engines for kvrelay's workers: ``VllmPrefillEngine`` and ``VllmDecodeEngine``.

They implement ``workers.engine.PrefillEngine`` / ``DecodeEngine`` on vLLM's ``AsyncLLM`` with
kvrelay's KV connector (``connector.py``) loaded into vLLM. The prefill engine owns a
shared-memory export region (``transport.kv.region``) and its lease table; the decode engine
reads other engines' regions (``transport.kv.shm``). See ``prefill_engine.py``,
``decode_engine.py`` and ``runtime.py``; the vLLM environment variables are in ``env.py``.

Importing this module does not import vLLM (that happens in ``start``).
"""

from kvrelay.workers.vllm_engine.decode_engine import VllmDecodeEngine
from kvrelay.workers.vllm_engine.prefill_engine import VllmPrefillEngine

__all__ = ["VllmDecodeEngine", "VllmPrefillEngine"]
