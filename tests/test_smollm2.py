"""End-to-end checks on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from elastic_llm import FinishReason, LLMEngine, SamplingParams

pytestmark = pytest.mark.smollm2

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
           "List three uses of copper.")


def test_greedy_tokens_equal_transformers(smollm2: Any) -> None:
    from transformers import LlamaForCausalLM

    engine = LLMEngine(smollm2)
    completions = engine.generate(PROMPTS, SamplingParams(max_new_tokens=32), chat=True)
    reference = LlamaForCausalLM.from_pretrained(smollm2.checkpoint_dir).eval()
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        ids = engine.encode_prompt(prompt, chat=True)
        with torch.no_grad():
            want = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        assert list(completion.token_ids) == want[0, len(ids):].tolist()
    assert "Paris" in completions[0].text


def test_tokenizer_and_chat_template_equal_transformers(smollm2: Any) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2.checkpoint_dir))
    for text in ("Hello world!", " leading space", "Café ñ 東京 🙂", "a\n\nb\tc"):
        ids = smollm2.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert smollm2.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    chat = reference.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert smollm2.tokenizer.chat_prompt("hi") == chat


def test_cached_load_is_fast(smollm2: Any) -> None:
    from elastic_llm.model.loader import load_model

    started = time.perf_counter()
    load_model("smollm2-135m-instruct")  # the fixture already converted and cached it
    assert time.perf_counter() - started < 3.0


def test_stop_string_cuts_text_and_streaming_equals_final_text(smollm2: Any) -> None:
    engine = LLMEngine(smollm2)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=32), chat=True)[0].text
    stop = free.split()[3]
    engine.add_request("s", PROMPTS[1], SamplingParams(max_new_tokens=32, stop=[stop]), chat=True)
    streamed: list[str] = []
    while engine.has_unfinished():
        for output in engine.step():
            streamed.append(output.new_text)
    completion = engine.pop_completion("s")
    assert completion.finish_reason is FinishReason.STOP
    assert completion.text == free[: free.index(stop)]
    assert "".join(streamed) == completion.text


def test_cli_generate_streams_an_answer() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "elastic_llm.cli", "generate", "What is the capital of France?",
         "--max-new-tokens", "12", "--threads", "1"],
        capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr


def test_cli_rejects_bad_input_with_exit_code_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "elastic_llm.cli", "generate", "hi", "--max-new-tokens", "0"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "max_new_tokens" in result.stderr
