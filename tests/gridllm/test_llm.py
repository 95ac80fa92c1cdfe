"""gridllm.LLM end to end on tiny random models: parity with transformers, scheduler
invariance, sampling reproducibility, bad input and no leaked KV blocks."""

import functools
import random

import pytest

from gridllm import LLM, SamplingParams
from tests.worker_svc.hf_reference import hf_greedy
from tests.worker_svc.tiny_models import TINY_ARCHS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts_of(lengths, seed=0, vocab=320):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_requests_running == stats.num_requests_waiting == 0


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_greedy_matches_transformers_one_at_a_time_and_batched(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    llm = LLM(model_dir, block_size=4, num_kv_blocks=256, max_num_batched_tokens=512)
    prompts = prompts_of([3, 17, 9, 30, 1, 21])
    expected = [hf_greedy(model_dir, p, GREEDY.max_tokens)[0] for p in prompts]
    for prompt, want in zip(prompts, expected, strict=True):
        got = llm.generate(token_prompts([prompt]), GREEDY, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want
    batched = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in batched)
    assert_no_leak(llm)


SCHEDULER_CONFIGS = [
    dict(max_num_batched_tokens=7),                      # small prefill chunks
    dict(max_num_seqs=1),
    dict(enable_prefix_caching=False),
    dict(num_kv_blocks=14, max_num_batched_tokens=64),   # forces preemption
    dict(enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=256),
]


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS)
def test_outputs_do_not_change_with_scheduler_configuration(config, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    shared = prompts_of([13], seed=7)[0]
    prompts = [shared + p for p in prompts_of([3, 8, 1, 12], seed=8)] + prompts_of([5, 19])
    reference = LLM(model_dir, block_size=4, num_kv_blocks=256)
    want = [o.outputs[0].token_ids for o in reference.generate(token_prompts(prompts), GREEDY,
                                                               use_tqdm=False)]
    llm = LLM(model_dir, **{"block_size": 4, "num_kv_blocks": 256, **config})
    got = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert_no_leak(llm)
    if config.get("num_kv_blocks") == 14:
        assert llm.engine.stats().num_preemptions > 0


@functools.lru_cache(maxsize=64)
def _hf_greedy_ids(model_dir, prompt, num_new):
    return hf_greedy(model_dir, list(prompt), num_new)[0]


@pytest.mark.parametrize("max_steps_in_flight", [1, 2])
@pytest.mark.parametrize("config", [dict(), *SCHEDULER_CONFIGS,
                                    dict(scheduling_policy="priority", num_kv_blocks=14,
                                         max_num_batched_tokens=64)])
def test_overlapped_steps_match_transformers(config, max_steps_in_flight, tiny_model_dir):
    """Step N+1 queued before step N's ids are read (its inputs fed on the device) gives
    transformers' greedy ids under every scheduler configuration, and no block leaks."""
    model_dir = tiny_model_dir("llama")
    shared = prompts_of([9], seed=21)[0]
    prompts = [shared + p for p in prompts_of([2, 6, 1], seed=22)] + prompts_of([5, 14])
    llm = LLM(model_dir, **{"block_size": 4, "num_kv_blocks": 256, **config})
    llm.engine.max_steps_in_flight = max_steps_in_flight
    expected = [_hf_greedy_ids(model_dir, tuple(p), GREEDY.max_tokens) for p in prompts]
    for _ in range(2):  # the second round hits the prefix cache
        got = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == expected
        assert_no_leak(llm)
    assert not llm.engine.has_unfinished_requests()


def test_overlap_keeps_sampling_penalties_and_logprobs_exact(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompts = token_prompts(prompts_of([5, 11, 3], seed=23))
    params = [SamplingParams(temperature=0.9, seed=3, max_tokens=9, ignore_eos=True,
                             repetition_penalty=1.4, frequency_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True,
                             presence_penalty=1.0, min_tokens=3, logit_bias={7: 2.0},
                             prompt_logprobs=1),
              SamplingParams(temperature=1.1, top_k=20, seed=4, max_tokens=8,
                             ignore_eos=True, logits_processors=["no_repeat_ngram"],
                             extra_args={"no_repeat_ngram_size": 2})]
    runs = []
    for steps in (1, 2):
        llm = LLM(model_dir, block_size=4, num_kv_blocks=256, max_num_batched_tokens=8)
        llm.engine.max_steps_in_flight = steps
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs)
                     for o in outputs])
        assert_no_leak(llm)
    assert runs[0] == runs[1]


def test_shared_prefixes_hit_the_cache(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=256)
    shared = prompts_of([16], seed=3)[0]
    first = llm.generate(token_prompts([shared + [5]]), GREEDY, use_tqdm=False)[0]
    second = llm.generate(token_prompts([shared + [5]]), GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens == 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.stats().prefix_cache_hits >= 16


def test_seeded_sampling_reproduces_in_any_batch(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=256)
    prompt = prompts_of([6], seed=1)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(token_prompts([prompt]), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    mixed = llm.generate(token_prompts(prompts_of([4, 9]) + [prompt]), [others, others, seeded],
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone


def test_n_completions_and_priorities(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=256,
              scheduling_policy="priority")
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(token_prompts(prompts_of([5, 7])), params, priority=[1, 0],
                           use_tqdm=False)
    assert [o.request_id for o in outputs] == sorted(o.request_id for o in outputs)
    for output in outputs:
        assert [c.index for c in output.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 6 for c in output.outputs)
    assert_no_leak(llm)


def test_logprobs_and_prompt_logprobs(tiny_model_dir):
    import torch

    model_dir = tiny_model_dir("llama")
    llm = LLM(model_dir, block_size=4, num_kv_blocks=256)
    prompt = prompts_of([7], seed=4)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    out = llm.generate(token_prompts([prompt]), params, use_tqdm=False)[0]
    tokens, hf_logits = hf_greedy(model_dir, prompt, 4)
    completion = out.outputs[0]
    assert completion.token_ids == tokens and len(completion.logprobs) == 4
    for step, position in enumerate(completion.logprobs):
        want = torch.log_softmax(hf_logits[step], dim=-1)
        assert tokens[step] in position and len(position) == 3  # greedy token is rank 1
        for token_id, lp in position.items():
            assert lp.logprob == pytest.approx(want[token_id].item(), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert all(prompt[i] in out.prompt_logprobs[i] for i in range(1, len(prompt)))


@pytest.mark.parametrize("prompt, params, message", [
    ({"prompt_token_ids": []}, GREEDY, "empty"),
    ({"prompt_token_ids": list(range(2, 300))}, GREEDY, "max_model_len"),
    ({"prompt_token_ids": [5, 999999]}, GREEDY, "prompt_token_ids"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
    ("text needs a tokenizer", GREEDY, "tokenizer"),
])
def test_bad_input_raises_and_engine_keeps_serving(prompt, params, message, tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=256, max_model_len=128)
    good = token_prompts(prompts_of([5]))
    with pytest.raises(ValueError, match=message):
        llm.generate(good + [prompt], [GREEDY, params], use_tqdm=False)
    assert_no_leak(llm)
    assert len(llm.generate(good, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_bad_model_paths_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(str(tmp_path), scheduling_policy="lifo")


def test_unknown_argument_is_named_before_anything_loads(tmp_path):
    # The model does not exist: the argument is refused first.
    with pytest.raises(ValueError, match="unknown engine argument.*max_num_seq\\b"):
        LLM(str(tmp_path / "missing"), max_num_seq=8)
    with pytest.raises(ValueError, match="kv_cache_memory must be a byte count"):
        LLM(str(tmp_path / "missing"), kv_cache_memory="a lot")


def test_profile_dir_writes_a_chrome_trace(tiny_model_dir, tmp_path):
    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=64,
              profile_dir=str(tmp_path / "traces"))
    llm.generate(token_prompts(prompts_of([4])), SamplingParams(max_tokens=2), use_tqdm=False)
    traces = list((tmp_path / "traces").glob("*.json"))
    assert traces and '"traceEvents"' in traces[0].read_text()


def test_the_heap_sits_out_full_collections_only_while_generate_runs(tiny_model_dir):
    import gc
    import weakref

    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=64)
    before = gc.get_freeze_count()
    frozen_during_steps = []

    def observed_step(step=llm.engine.step):
        frozen_during_steps.append(gc.get_freeze_count())
        return step()

    llm.engine.step = observed_step  # a reference cycle: engine -> its step -> engine
    outputs = llm.generate(token_prompts(prompts_of([5, 9])), GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [GREEDY.max_tokens] * 2
    assert frozen_during_steps and min(frozen_during_steps) > before
    assert gc.get_freeze_count() == before
    # Handed back: a dropped LLM (cycles included) is collected, its KV cache freed.
    cache = weakref.ref(llm.engine.runner.kv_caches[0][0])
    del llm, observed_step
    gc.collect()
    assert cache() is None
