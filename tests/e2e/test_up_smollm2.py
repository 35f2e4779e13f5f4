"""`kvrelay up` end to end on the real SmolLM2-135M-Instruct: coherent answers, and greedy output equal
token for token to one plain vLLM instance of the same model."""

from __future__ import annotations

import httpx
import pytest

from kvrelay.models import resolve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_deployment(tmp_path_factory, start_deployment):
    dep = start_deployment(tmp_path_factory.mktemp("run"), "smollm2",
                ["--set", "engine.dtype=\"float32\"", "--set", "engine.max_model_len=2048"])
    yield dep
    assert dep.stop() == 0, "".join(dep.output[-40:])


def test_up_smollm2_answers_through_the_openai_client(smollm2_deployment) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{smollm2_deployment.url}/v1", api_key="unused", timeout=300)
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content


def test_up_smollm2_greedy_output_equals_plain_vllm(smollm2_deployment, plain_vllm) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2")))
    questions = ["Explain in two sentences why the sky is blue.",
                 "Write a haiku about the sea. " + "It should be calm and quiet. " * 12]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True) for q in questions]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    got = []
    for ids in prompts:
        r = httpx.post(f"{smollm2_deployment.url}/v1/completions", timeout=300,
                       json={"model": "SmolLM2-135M-Instruct", "prompt": ids, "max_tokens": 32, "temperature": 0})
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    want = [o["text"] for o in plain_vllm("smollm2", "float32", prompts, 32)]
    assert got == want
