"""The router's tokenizer on the tiny model's folder (SmolLM2's tokenizer and chat template)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from kvrelay.router.errors import BadRequest
from kvrelay.router.tokenizer import RouterTokenizer, TokenizerError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there>"}]


def test_tokenizer_reads_context_eos_and_vocab(tokenizer: RouterTokenizer) -> None:
    assert tokenizer.max_context == 8192
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.vocab_size >= 49152
    assert tokenizer.has_chat_template


def test_tokenizer_chat_matches_the_models_chat_template(tokenizer: RouterTokenizer) -> None:
    hf = tokenizer._tok
    expected = list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tokenizer.encode_chat_sync(MESSAGES) == expected
    text = tokenizer.render_chat(MESSAGES)
    assert text.endswith("<|im_start|>assistant\n") and "Hi <there>" in text


def test_tokenizer_prompt_round_trips(tokenizer: RouterTokenizer) -> None:
    ids = tokenizer.encode_prompt_sync("The capital of France is")
    assert ids and tokenizer.decode(ids) == "The capital of France is"


async def test_tokenizer_encodes_long_prompts_off_the_event_loop(tokenizer: RouterTokenizer) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 400  # over inline_chars
    assert len(long) > tokenizer.inline_chars
    seen = []
    real = tokenizer.encode_prompt_sync

    def spy(text: str) -> list[int]:
        seen.append(threading.current_thread() is threading.main_thread())
        return real(text)

    tokenizer.encode_prompt_sync = spy  # type: ignore[method-assign]
    try:
        ids = await tokenizer.encode_prompt(long)
        short = await tokenizer.encode_prompt("short")
        chat = await tokenizer.encode_chat([{"role": "user", "content": long}])
    finally:
        del tokenizer.encode_prompt_sync
    assert seen == [False, True]  # the long one ran on the tokenizer's thread, the short one inline
    assert ids == real(long) and short == real("short")
    assert chat == tokenizer.encode_chat_sync([{"role": "user", "content": long}])


async def test_tokenizer_load_runs_in_a_thread_and_matches(tokenizer: RouterTokenizer) -> None:
    other = await asyncio.wait_for(RouterTokenizer.load(tokenizer.folder), 120)
    try:
        assert other.encode_chat_sync(MESSAGES) == tokenizer.encode_chat_sync(MESSAGES)
    finally:
        other.close()


def test_tokenizer_refuses_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
        RouterTokenizer.load_sync(tmp_path)


def test_tokenizer_without_chat_template_rejects_chat(tokenizer: RouterTokenizer) -> None:
    tokenizer.has_chat_template = False
    try:
        with pytest.raises(BadRequest, match="no chat template"):
            tokenizer.encode_chat_sync(MESSAGES)
    finally:
        tokenizer.has_chat_template = True
