"""kvrelay.models: cached, idempotent, lock-serialized model preparation.

The real models are prepared in the real cache (shared and kept between runs: the first
run builds SmolLM2 in ~50 s, later runs find it). Tests that rebuild use a temporary
KVRELAY_CACHE, either with the tiny model (no SmolLM2 needed) or with a quick recipe that
exercises only the marker / lock / rename machinery.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvrelay import models
from kvrelay.models import MARKER, RECIPE_VERSION, ModelError, ModelPrepareError, Recipe

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return models.prepare("smollm2")


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return models.prepare("tiny")


# ---------------------------------------------------------------- the real models


def test_models_import_loads_no_heavy_library() -> None:
    code = (
        "import sys, kvrelay.models; print(sorted({'torch','transformers','gguf','vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_prepare_second_call_returns_same_folder_without_rebuilding(name: str, request) -> None:
    first = request.getfixturevalue(f"{name}_dir")
    marker_before = (first / MARKER).stat()
    weights_before = (first / "model.safetensors").stat()
    again = models.prepare(name)
    assert again == first == models.model_dir(name)
    assert (first / MARKER).stat().st_mtime_ns == marker_before.st_mtime_ns
    assert (first / "model.safetensors").stat().st_ino == weights_before.st_ino
    assert models.is_prepared(first, name)


def test_prepare_smollm2_writes_plain_llama_folder(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = [
        config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    ]
    assert shape == [30, 9, 3, 64]
    assert config["vocab_size"] == 49152
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list(smollm2_dir.parent.glob(".smollm2-135m-instruct.tmp-*"))


def test_prepare_tiny_is_small_llama_with_long_context(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["head_dim"] == 64
    assert config["max_position_embeddings"] >= 4096
    assert config["vocab_size"] == 49152


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_prepared_tokenizer_applies_chat_template(name: str, request) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{name}_dir"))
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, return_dict=False
    )
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_prepare_tiny_shares_smollm2_tokenizer(smollm2_dir: Path, tiny_dir: Path) -> None:
    assert _sha256(tiny_dir / "tokenizer.json") == _sha256(smollm2_dir / "tokenizer.json")


def test_resolve_name_prepares_and_returns_folder(tiny_dir: Path) -> None:
    assert models.resolve("tiny") == tiny_dir
    assert models.resolve("TINY") == tiny_dir


def test_resolve_existing_folder_returned_as_is(tiny_dir: Path, tmp_path: Path) -> None:
    assert models.resolve(str(tiny_dir)) == tiny_dir
    own = tmp_path / "my-model"
    own.mkdir()
    (own / "config.json").write_text("{}")
    assert models.resolve(own) == own


@pytest.mark.parametrize("bad", ["gpt-4", "does/not/exist", ""])
def test_resolve_unknown_raises_model_error_naming_choices(bad: str) -> None:
    with pytest.raises(ModelError) as info:
        models.resolve(bad)
    assert isinstance(info.value, ValueError)
    assert "smollm2" in str(info.value) and "tiny" in str(info.value)


def test_resolve_folder_without_config_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="without config.json"):
        models.resolve(tmp_path)


def test_prepare_unknown_name_raises_model_error() -> None:
    with pytest.raises(ModelError, match="smollm2, tiny"):
        models.prepare("llama-70b")


def test_served_name_is_stable(smollm2_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    assert models.served_name(smollm2_dir) == "SmolLM2-135M-Instruct"
    assert models.served_name(tiny_dir) == "kvrelay-tiny"
    own = tmp_path / "Other-Model-7B"
    own.mkdir()
    assert models.served_name(own) == "Other-Model-7B"


def test_prepare_tiny_rebuilds_stale_recipe_version_identically(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVRELAY_CACHE", str(tmp_path))
    built = models.prepare("tiny")
    assert built == tmp_path / "models" / "kvrelay-tiny"
    # seeded init: the same weights as the default cache's copy (built earlier, maybe elsewhere)
    assert _sha256(built / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    marker = json.loads((built / MARKER).read_text())
    marker["recipe_version"] = RECIPE_VERSION - 1
    (built / MARKER).write_text(json.dumps(marker))
    old_inode = (built / "model.safetensors").stat().st_ino
    assert not models.is_prepared(built, "tiny")

    assert models.prepare("tiny") == built
    assert json.loads((built / MARKER).read_text())["recipe_version"] == RECIPE_VERSION
    assert (built / "model.safetensors").stat().st_ino != old_inode
    assert _sha256(built / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    assert sorted(p.name for p in built.parent.iterdir()) == [".kvrelay-tiny.lock", "kvrelay-tiny"]


# ---------------------------------------------------------------- the machinery, with a quick recipe

QUICK_RECIPE = """
import sys, time
from pathlib import Path
from kvrelay import models
from kvrelay.base import logs

def build(out):
    log = Path(sys.argv[1])
    with log.open("a") as f:
        f.write("build\\n")
    go = Path(sys.argv[2])
    deadline = time.monotonic() + 60
    while not go.exists():  # the test says when this build may finish
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.02)
    (out / "config.json").write_text("{}")
    (out / "weights.bin").write_bytes(b"w" * 1000)
    return {}

models.RECIPES["quick"] = models.Recipe("quick", "quick-model", "quick", build)
"""


@pytest.fixture()
def quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A recipe that logs each build and writes two files; in this process and in children."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVRELAY_CACHE", str(cache))
    log, go = tmp_path / "builds.log", tmp_path / "go"
    go.touch()

    def build(out: Path) -> dict:
        with log.open("a") as f:
            f.write("build\n")
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"w" * 1000)
        return {}

    monkeypatch.setitem(models.RECIPES, "quick", Recipe("quick", "quick-model", "quick", build))
    return cache / "models" / "quick-model", log, go


def _builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_prepare_rebuilds_half_built_folder(quick) -> None:
    target, log, _ = quick
    assert models.prepare("quick") == target
    (target / "weights.bin").write_bytes(b"short")  # a crash mid-copy, or a tampered file
    leftover = target.parent / ".quick-model.tmp-crashed"
    leftover.mkdir()
    (leftover / "partial").write_text("x")

    assert models.prepare("quick") == target
    assert _builds(log) == 2
    assert (target / "weights.bin").stat().st_size == 1000
    assert not leftover.exists()


def test_prepare_rebuilds_folder_without_marker(quick) -> None:
    target, log, _ = quick
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # looks like a model, but no marker: not ours / unfinished
    assert models.prepare("quick") == target
    assert _builds(log) == 1
    assert models.is_prepared(target, "quick")
    assert not models.is_prepared(target, "tiny")  # a marker names its model


def test_prepare_build_failure_raises_and_leaves_no_folder(quick, monkeypatch: pytest.MonkeyPatch) -> None:
    target, _, _ = quick

    def broken(out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(models.RECIPES, "quick", Recipe("quick", "quick-model", "quick", broken))
    with pytest.raises(ModelPrepareError, match="disk on fire"):
        models.prepare("quick")
    assert not target.exists()
    assert not list(target.parent.glob(".quick-model.tmp-*"))


def _spawn_quick(tmp_path: Path, log: Path, go: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "quick.py"
    script.write_text(
        QUICK_RECIPE + "\nlogs.setup('test', 'info', 'json')\nprint(models.prepare('quick'), flush=True)\n"
    )
    stderr = tmp_path / f"{tag}.err"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(log), str(go)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    return proc, stderr


def test_prepare_concurrent_processes_build_once(quick, tmp_path: Path) -> None:
    target, log, go = quick
    go.unlink()
    first, first_err = _spawn_quick(tmp_path, log, go, "first")
    second = None
    try:
        _wait_for(lambda: _builds(log) == 1, 60, "the first process to start building")
        second, second_err = _spawn_quick(tmp_path, log, go, "second")
        _wait_for(
            lambda: "model_prepare_waiting" in second_err.read_text(), 60, "the second to wait on the lock"
        )
        # while the first holds the lock, a caller with a short timeout gives up cleanly
        with pytest.raises(ModelPrepareError, match="still preparing"):
            models.prepare("quick", lock_timeout_s=0.3)
        go.touch()
        out_first, _ = first.communicate(timeout=60)
        out_second, _ = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert first.returncode == 0, first_err.read_text()
    assert second.returncode == 0, second_err.read_text()
    assert out_first.strip() == out_second.strip() == str(target)
    assert _builds(log) == 1
    assert models.is_prepared(target, "quick")


# ---------------------------------------------------------------- through vLLM

VLLM_CHECK = """
import json, sys
from vllm import LLM, SamplingParams

def main():
    smollm2, tiny = sys.argv[1], sys.argv[2]
    result = {}
    llm = LLM(model=smollm2, max_model_len=512, enforce_eager=True, block_size=32, seed=0)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))
    result["smollm2"] = out[0].outputs[0].text
    del llm
    llm = LLM(model=tiny, max_model_len=512, enforce_eager=True, block_size=32, seed=0)
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    result["tiny"] = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def vllm_outputs(smollm2_dir: Path, tiny_dir: Path, tmp_path_factory) -> dict:
    """Greedy outputs of both prepared models from vllm.LLM (engine in-process, in a child
    process so vLLM's global settings do not leak into the test process)."""
    script = tmp_path_factory.mktemp("vllm") / "check.py"
    script.write_text(VLLM_CHECK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(script), str(smollm2_dir), str(tiny_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.e2e
def test_prepared_smollm2_answers_coherently_in_vllm(vllm_outputs: dict) -> None:
    assert "Paris" in vllm_outputs["smollm2"]


@pytest.mark.e2e
def test_prepared_tiny_greedy_output_varies_in_vllm(vllm_outputs: dict) -> None:
    outputs = vllm_outputs["tiny"]
    assert all(len(ids) == 32 for ids in outputs)
    assert len({tuple(ids) for ids in outputs}) == len(outputs)  # prompts lead to different text
    assert all(len(set(ids)) >= 8 for ids in outputs)  # not one token forever
