"""Sliding-window models end to end: greedy ids identical to transformers with prompts longer
than the window, through chunked prefill and preemption."""

import pytest

from gridllm import LLM, SamplingParams
from tests.gridllm.test_llm import assert_no_leak, prompts_of, token_prompts
from tests.worker_svc.hf_reference import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Windows: mistral-w12 12 on every layer; gemma2 and gemma3 6 on local layers, none on global.
ARCHS = ["mistral-w12", "gemma2", "gemma3"]
SCHEDULES = {
    "chunked": dict(num_kv_blocks=256, max_num_batched_tokens=5),
    "preempted": dict(num_kv_blocks=16, max_num_batched_tokens=64),
    "chunked+preempted": dict(num_kv_blocks=16, max_num_batched_tokens=7),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_past_the_window(arch, schedule, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    prompts = prompts_of([27, 14, 31, 19, 24], seed=11)
    want = [hf_greedy(model_dir, p, GREEDY.max_tokens)[0] for p in prompts]
    llm = LLM(model_dir, block_size=4, **SCHEDULES[schedule])
    got = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert_no_leak(llm)
    if "preempted" in schedule:
        assert llm.engine.stats().num_preemptions > 0
