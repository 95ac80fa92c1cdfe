"""``LLM(block_reservation="predicted")``: same greedy ids as an unconstrained run, with
fewer preemptions on a small KV pool."""

import pytest

from gridllm import LLM, SamplingParams
from tests.gridllm.test_llm import assert_no_leak, prompts_of, token_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("num_kv_blocks, max_num_batched_tokens", [(14, 64), (14, 7)])
def test_reservation_keeps_outputs_and_cuts_preemptions(num_kv_blocks, max_num_batched_tokens,
                                                        tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    shared = prompts_of([13], seed=7)[0]
    prompts = [shared + p for p in prompts_of([3, 8, 1, 12], seed=8)] + prompts_of([5, 19])
    reference = LLM(model_dir, block_size=4, num_kv_blocks=256)
    want = [o.outputs[0].token_ids
            for o in reference.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
    num_preemptions = {}
    for mode in ("none", "predicted"):
        llm = LLM(model_dir, block_size=4, num_kv_blocks=num_kv_blocks,
                  max_num_batched_tokens=max_num_batched_tokens, block_reservation=mode)
        assert llm.engine.scheduler.config.block_reservation == mode
        got = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want, mode
        assert_no_leak(llm)
        num_preemptions[mode] = llm.engine.stats().num_preemptions
    assert num_preemptions["none"] > 0
    assert num_preemptions["predicted"] < num_preemptions["none"]


def test_bad_block_reservation_names_the_field(tiny_model_dir):
    with pytest.raises(ValueError, match="block_reservation must be one of"):
        LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=16, block_reservation="yes")
