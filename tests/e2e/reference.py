"""A plain vLLM run (no kvrelay, no connector) of token-id prompts, greedy: the reference outputs.

Run as a script in its own process (vLLM sets process-wide state):
    python reference.py < {"model": path, "dtype": ..., "prompts": [[ids]], "max_tokens": n}
prints [{"token_ids": [...], "text": "..."}] as JSON on the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    req = json.loads(sys.stdin.read())
    os.environ.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      TOKENIZERS_PARALLELISM="false")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=req["model"], dtype=req["dtype"], block_size=32, max_model_len=req["max_model_len"],
              enforce_eager=True, seed=0, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"])
    outs = []
    for ids in req["prompts"]:  # one at a time, like the requests sent to kvrelay
        (res,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        outs.append({"token_ids": list(res.outputs[0].token_ids), "text": res.outputs[0].text})
    print(json.dumps(outs))


if __name__ == "__main__":
    main()
