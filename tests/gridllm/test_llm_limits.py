"""gridllm.LLM refuses max_tokens past the context and requests past its limits with a
ValueError naming the field, leaving nothing queued; at the bounds it serves."""

from __future__ import annotations

import pytest

from gridllm import LLM, SamplingParams

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=64,
               max_model_len=MAX_MODEL_LEN, max_logprobs=2, max_n=3)


def _no_leak(llm) -> bool:
    stats = llm.engine.stats()
    return (stats.kv_blocks_free == stats.kv_blocks_total
            and stats.num_requests_running == stats.num_requests_waiting == 0)


def test_max_tokens_past_the_context_raises_naming_max_tokens(llm):
    prompt = {"prompt_token_ids": [5] * 60}
    fits = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=r"^max_tokens must be at most 4 for this prompt: the "
                                         r"prompt has 60 tokens and max_model_len is 64"):
        llm.generate([prompt, prompt], [fits, fits.clone(max_tokens=5)], use_tqdm=False)
    assert _no_leak(llm)
    output = llm.generate(prompt, fits, use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == 4 and output.finish_reason == "length"


@pytest.mark.parametrize("params,message", [
    (SamplingParams(n=4), r"^n must be at most 3 completions \(max_n\)"),
    (SamplingParams(logprobs=3), r"^logprobs must be at most 2 .*\(max_logprobs\)"),
    (SamplingParams(prompt_logprobs=3), r"^prompt_logprobs must be at most 2"),
])
def test_requests_past_the_engines_limits_raise(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate({"prompt_token_ids": [5, 6]}, params, use_tqdm=False)
    assert _no_leak(llm)
    at_limit = SamplingParams(n=3, logprobs=2, prompt_logprobs=2, max_tokens=2)
    assert len(llm.generate({"prompt_token_ids": [5, 6]}, at_limit,
                            use_tqdm=False)[0].outputs) == 3
