"""The hybrid KV layout end to end (Gemma 2: local layers with a window of 6, global
layers): greedy ids identical to transformers while the local layers' KV groups give back
the blocks before their window, through chunked prefill, preemption and the prefix cache."""

from gridllm import LLM, SamplingParams
from tests.gridllm.test_llm import assert_no_leak, prompts_of, token_prompts
from tests.worker_svc.hf_reference import hf_greedy

WINDOW = 6


def assert_every_group_free(llm):
    assert_no_leak(llm)
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.group_block_tables() == {}
    assert all(not tables for tables in bm._tables)


def test_gemma2_has_a_global_and_local_kv_groups(tiny_model_dir):
    llm = LLM(tiny_model_dir("gemma2"), block_size=4, num_kv_blocks=16)
    limits = llm.engine.scheduler.limits
    # Layers 0 and 2 are local, layer 1 global: three groups of one layer each, and the
    # pool holds three ids for every block of all three layers.
    assert limits.kv_window is None and limits.kv_group_windows == (0, WINDOW, WINDOW)
    assert llm.engine.scheduler.block_manager.num_blocks == 48


def test_long_request_holds_only_the_window_in_local_groups(tiny_model_dir):
    model_dir = tiny_model_dir("gemma2")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt, = prompts_of([45], seed=5)
    want = hf_greedy(model_dir, prompt, params.max_tokens)[0]
    chunk = 8
    llm = LLM(model_dir, block_size=4, num_kv_blocks=64, max_num_batched_tokens=chunk)
    engine = llm.engine
    bm = engine.scheduler.block_manager
    engine.add_request(engine.make_request("r", prompt, params))
    held, tokens = [], []
    while engine.has_unfinished_requests():
        for update in engine.step():
            tokens += update.new_token_ids
        held.append([bm.num_held_blocks("r", g) for g in range(bm.num_groups)])
    assert tokens == want
    # The last sampled token's KV is never computed.
    num_computed = len(prompt) + params.max_tokens - 1
    assert max(h[0] for h in held) == -(-num_computed // 4)
    for g in (1, 2):
        # The window, the step's tokens (a chunk at most), and the partial blocks.
        assert max(h[g] for h in held if h[0]) <= -(-(WINDOW + chunk) // 4) + 1
    assert_every_group_free(llm)


def test_greedy_ids_through_preemption_and_the_prefix_cache(tiny_model_dir):
    model_dir = tiny_model_dir("gemma2")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    shared, = prompts_of([26], seed=3)
    tails = prompts_of([3, 9, 5, 14], seed=4)
    prompts = [shared + tail for tail in tails]
    want = [hf_greedy(model_dir, p, params.max_tokens)[0] for p in prompts]
    # 11 blocks of every layer (33 ids): the requests do not all fit, so some are
    # preempted and recomputed; the chunk of 7 splits the prompts.
    llm = LLM(model_dir, block_size=4, num_kv_blocks=11, max_num_batched_tokens=7)
    got = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert llm.engine.stats().num_preemptions > 0
    assert_every_group_free(llm)
    # With room to keep it cached, one at a time: each later request hits the shared
    # prefix (the global group's blocks and the local groups' window) and still decodes
    # the same ids.
    # Logprobs too: a wrong key seen by one query rarely flips a greedy id.
    llm = LLM(model_dir, block_size=4, num_kv_blocks=64, max_num_batched_tokens=7)
    with_logprobs = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    for k, (prompt, ids) in enumerate(zip(prompts, want, strict=True)):
        out, = llm.generate(token_prompts([prompt]), with_logprobs, use_tqdm=False)
        assert out.outputs[0].token_ids == ids
        assert out.num_cached_tokens >= (24 if k else 0)
        want_logprobs = hf_greedy(model_dir, prompt, params.max_tokens)[1].log_softmax(-1)
        for step, (token, entry) in enumerate(zip(ids, out.outputs[0].logprobs, strict=True)):
            assert abs(entry[token].logprob - want_logprobs[step, token].item()) < 1e-4
    assert_every_group_free(llm)
