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
    # 8 blocks: with 16, Gemma's requests (whose local layers' KV groups give back the
    # blocks before their window) all fit and nothing is preempted.
    "preempted": dict(num_kv_blocks=8, max_num_batched_tokens=64),
    # 12 blocks: with 16, Mistral's requests (which give back the blocks before their
    # window) all fit and nothing is preempted.
    "chunked+preempted": dict(num_kv_blocks=12, max_num_batched_tokens=7),
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


@pytest.mark.parametrize("arch, kv_window", [("mistral-w12", 12), ("gemma2", None)])
def test_blocks_before_the_window_are_given_back_as_a_request_advances(
        arch, kv_window, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt, = prompts_of([27], seed=5)
    want = hf_greedy(model_dir, prompt, params.max_tokens)[0]
    llm = LLM(model_dir, block_size=4, num_kv_blocks=64, max_num_batched_tokens=8)
    engine = llm.engine
    # Only a window on every layer lets blocks go (Gemma 2's global layers see everything).
    assert engine.scheduler.limits.kv_window == kv_window
    engine.add_request(engine.make_request("r", prompt, params))
    held, tokens = [], []
    while engine.has_unfinished_requests():
        for update in engine.step():
            tokens += update.new_token_ids
        held.append(engine.scheduler.block_manager.num_held_blocks("r"))
    assert tokens == want
    assert_no_leak(llm)
    num_tokens = len(prompt) + params.max_tokens
    if kv_window is None:
        assert max(held) == -(-num_tokens // 4)
    else:
        # The window, the step's tokens (a chunk of 8 at most), and the partial blocks.
        assert max(held) <= -(-(kv_window + 8) // 4) + 1 < -(-num_tokens // 4)
