"""The persistent input batch: rows compacted in place, tokens fed from the device, and
penalty state kept across steps (checked against per-token loops over a transformers
forward of the whole sequence)."""

import numpy as np
import pytest
import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.contract import NewRequestData
from gridllm.common.sampling_params import SamplingParams
from tests.worker_svc.hf_reference import hf_prompt_logits
from tests.worker_svc.step_driver import run_requests
from worker_svc.input_batch import InputBatch
from worker_svc.model_runner import ModelRunner
from worker_svc.request_state import RequestState

CPU = torch.device("cpu")


def _state(req_id, prompt, output=(), blocks=(0,), params=None):
    new = NewRequestData(req_id, list(prompt), params or SamplingParams(temperature=0.0),
                         list(output), list(blocks), 0)
    return RequestState.from_new(new, seed=hash(req_id) & 0xFFFF)


def test_finished_row_is_filled_by_the_last_row():
    batch = InputBatch(2, 64, 4, 50, CPU)  # grows past its first 2 rows
    penalised = SamplingParams(temperature=0.7, repetition_penalty=1.3)
    for i, req_id in enumerate("abcd"):
        batch.add(_state(req_id, [i + 1] * (i + 2), blocks=[10 * i, 10 * i + 1],
                         params=penalised if req_id == "d" else None))
    assert batch.capacity >= 4 and batch.req_ids == list("abcd")
    batch.remove("b")
    assert batch.req_ids == ["a", "d", "c"] and batch.rows == {"a": 0, "d": 1, "c": 2}
    assert batch.token_ids[1, :5].tolist() == [4] * 5 and batch.num_known[1] == 5
    assert batch.block_table[1, :2].tolist() == [30, 31] and batch.num_blocks[1] == 2
    assert batch.temperature[1] == pytest.approx(0.7) and batch.has_penalties[1]
    assert batch.prompt_mask is not None and batch.prompt_mask[1, 4]
    assert int(batch.prompt_mask[1].sum()) == 1
    batch.update_cached("d", [32], num_computed_tokens=3)
    assert batch.block_table[1, :3].tolist() == [30, 31, 32] and batch.num_computed[1] == 3


@pytest.mark.parametrize("num_scheduled,prefix", [([1, 1, 3], 2), ([3, 1, 1], 0),
                                                  ([1, 3, 1], 0), ([2, 3, 4], 0),
                                                  ([1, 1, 1], 3)])
def test_one_query_requests_first_are_marked(num_scheduled, prefix):
    """``one_token_prefix``: the step's one-query requests when they are all first, else 0."""
    batch = InputBatch(4, 64, 4, 50, CPU)
    for i in range(3):
        batch.add(_state("abc"[i], [1] * 8, blocks=[2 * i, 2 * i + 1]))
    meta = batch.prepare(np.array(num_scheduled)).attn_metadata
    assert meta.num_one_token == num_scheduled.count(1)
    assert meta.one_token_prefix == prefix


def test_one_query_requests_are_put_first_with_all_their_row_state():
    """``put_one_query_first`` swaps whole rows (tokens, tables, sampling parameters,
    penalty tables) so the step's one-query requests lead; the step then marks them."""
    batch = InputBatch(4, 64, 4, 50, CPU)
    penalised = SamplingParams(temperature=0.7, repetition_penalty=1.3)
    for i, req_id in enumerate("abcd"):
        batch.add(_state(req_id, [i + 1] * (i + 5), blocks=[10 * i, 10 * i + 1, 10 * i + 2],
                         params=penalised if req_id == "a" else None))
    before = {r: (batch.token_ids[row, :8].tolist(), batch.block_table[row, :3].tolist(),
                  float(batch.temperature[row]), bool(batch.has_penalties[row]),
                  int(batch.num_known[row]))
              for r, row in batch.rows.items()}
    assert batch.prompt_mask is not None and batch.prompt_mask[0, 1]
    ordered = batch.put_one_query_first(np.array([3, 1, 2, 1]))
    assert ordered.tolist() == [1, 1, 2, 3] and batch.req_ids == ["d", "b", "c", "a"]
    assert batch.rows == {"d": 0, "b": 1, "c": 2, "a": 3}
    for r, row in batch.rows.items():
        assert (batch.token_ids[row, :8].tolist(), batch.block_table[row, :3].tolist(),
                float(batch.temperature[row]), bool(batch.has_penalties[row]),
                int(batch.num_known[row])) == before[r]
    assert batch.prompt_mask[3, 1] and int(batch.prompt_mask[3].sum()) == 1
    assert not batch.prompt_mask[0].any()
    meta = batch.prepare(ordered).attn_metadata
    assert (meta.num_one_token, meta.one_token_prefix) == (2, 2)
    assert meta.seq_lens.tolist() == [1, 1, 2, 3]
    same = batch.put_one_query_first(ordered)
    assert same is ordered and batch.req_ids == ["d", "b", "c", "a"]


def test_sampled_token_is_fed_on_the_device_until_the_host_reads_it():
    batch = InputBatch(4, 64, 4, 50, CPU)
    state = _state("a", [5, 6, 7], blocks=[7, 8])
    batch.add(state)
    inputs = batch.prepare(np.array([3]))
    assert inputs.input_ids.tolist() == [5, 6, 7] and inputs.is_sampling.tolist() == [True]
    assert inputs.attn_metadata.num_one_token == 0
    batch.record_samples(torch.tensor([42]), inputs)
    batch.update_cached("a", [], num_computed_tokens=3)
    again = batch.prepare(np.array([1]))
    assert again.input_ids.tolist() == [42] and again.positions.tolist() == [3]
    assert again.attn_metadata.slot_mapping.tolist() == [7 * 4 + 3]
    assert again.attn_metadata.num_one_token == 1
    assert again.attn_metadata.one_token_prefix == 1
    batch.append_known_token(state, 42)
    assert state.token_ids == [5, 6, 7, 42] and batch.num_pending[0] == 0
    with pytest.raises(ValueError, match="exceed"):
        batch.prepare(np.array([2]))


def _reference_with_penalties(model_dir, prompt, params, num_new):
    """Greedy decoding of a full transformers forward per token, penalties by loops."""
    tokens = list(prompt)
    for _ in range(num_new):
        logits = hf_prompt_logits(model_dir, tokens)[-1].tolist()
        output = tokens[len(prompt):]
        for t, x in enumerate(logits):
            if t in prompt or t in output:
                rep = params.repetition_penalty
                x = x / rep if x > 0 else x * rep
            count = output.count(t)
            logits[t] = x - params.frequency_penalty * count - params.presence_penalty * (
                count > 0)
        tokens.append(max(range(len(logits)), key=logits.__getitem__))
    return tokens[len(prompt):]


def test_penalties_follow_the_requests_across_steps_and_rows(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    runner = ModelRunner(ModelConfig(model=model_dir, device="cpu"),
                         CacheConfig(block_size=4, num_kv_blocks=64), SchedulerConfig())
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 40, (n,), generator=gen).tolist() for n in (6, 11, 4)]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7,
                             repetition_penalty=0.9)]
    # A budget of 5 tokens leaves some requests out of some steps: their rows go and
    # come back.
    outputs, _ = run_requests(runner, prompts, params, 6, chunk_budget=5)
    for prompt, p, got in zip(prompts, params, outputs, strict=True):
        assert got == _reference_with_penalties(model_dir, prompt, p, 6)


@pytest.mark.parametrize("mix,no_top_k,no_top_p", [
    ([SamplingParams(temperature=0.7)], True, True),
    ([SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.0)], True,
     False),
    ([SamplingParams(temperature=0.7, top_k=5, min_p=0.1)], False, True),
    ([SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.0, top_p=0.5)],
     False, False),
    # A greedy row's filters are never applied: they launch no search.
    ([SamplingParams(temperature=0.0, top_k=5, top_p=0.5), SamplingParams(temperature=0.8)],
     True, True),
])
def test_sampling_metadata_names_the_searches_no_row_needs(mix, no_top_k, no_top_p):
    """Both ways of building a step's sampling metadata (the persistent batch's and the
    one from parameters) say which top-k / top-p search no random row of the batch
    needs; the sampling kernel launches only the first pass of those."""
    from worker_svc.sampling_metadata import SamplingMetadata

    batch = InputBatch(4, 64, 4, 50, CPU)
    for i, params in enumerate(mix):
        batch.add(_state(f"r{i}", [1, 2], params=params))
    inputs = batch.prepare(np.full(len(mix), 2))
    from_batch = batch.sampling_metadata(inputs, eos_token_id=None)
    built = SamplingMetadata.build(mix, [[1, 2]] * len(mix), [[]] * len(mix),
                                   [None] * len(mix), [None] * len(mix), 50, CPU)
    for meta in (from_batch, built):
        assert (meta.no_top_k, meta.no_top_p) == (no_top_k, no_top_p)
