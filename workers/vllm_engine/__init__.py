"""kvrelay's vLLM engines and KV connector.

- ``VllmPrefillEngine`` / ``VllmDecodeEngine`` (``engine.py``): the ``workers.engine`` Protocols on
  vLLM's ``AsyncLLM``; the prefill engine exports finished prefills' KV into a shared-memory
  region it owns, the decode engine imports it.
- ``KVRelayConnector`` (``connector.py``): the ``KVConnectorBase_V1`` vLLM loads by module path;
  it copies KV between vLLM's paged cache and kvrelay's memory inside vLLM's process.
- ``env.py``: the environment variables kvrelay sets for vLLM.

Importing this package does not import vLLM; starting an engine does.
"""

from kvrelay.workers.vllm_engine.engine import VllmDecodeEngine, VllmPrefillEngine

__all__ = ["VllmDecodeEngine", "VllmPrefillEngine"]
