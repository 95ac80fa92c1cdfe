"""Scheduler policy against a contract-checking simulated runner.

The simulated runner's "model" is a deterministic function of the whole token history,
so any scheduling mistake (a lost token, a wrong chunk, a stale block table) changes
the generated ids. The real model runner is covered in tests/worker_svc and tests/gridllm.
"""

import pytest

from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ModelLimits, ModelRunnerOutput, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import Scheduler

VOCAB = 1000


def next_token(tokens):
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 7919 + len(tokens)) % VOCAB


class SimulatedRunner:
    """Keeps per-request state as the real runner does and checks every delta."""

    def __init__(self, block_size, num_blocks):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.state = {}
        self.num_steps = 0

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        for req_id in out.finished_req_ids:
            self.state.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.state, "a known request was sent in full again"
            self.state[new.req_id] = {
                "tokens": new.prompt_token_ids + new.output_token_ids,
                "blocks": list(new.block_ids), "computed": new.num_computed_tokens}
        for cached in out.scheduled_cached_reqs:
            st = self.state[cached.req_id]
            assert st["computed"] == cached.num_computed_tokens
            st["blocks"] += cached.new_block_ids
        result = ModelRunnerOutput()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        for req_id, n in out.num_scheduled_tokens.items():
            st = self.state[req_id]
            end = st["computed"] + n
            assert n >= 1 and end <= len(st["tokens"])
            assert len(st["blocks"]) * self.block_size >= end, "block table too short"
            assert len(set(st["blocks"])) == len(st["blocks"])
            assert all(0 <= b < self.num_blocks for b in st["blocks"])
            st["computed"] = end
            if end == len(st["tokens"]):
                token = next_token(st["tokens"])
                st["tokens"].append(token)
                result.req_ids.append(req_id)
                result.sampled_token_ids[req_id] = [token]
        return result


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def make_scheduler(num_blocks=64, block_size=4, max_model_len=256, **kwargs):
    limits = ModelLimits(max_model_len=max_model_len, vocab_size=VOCAB, block_size=block_size)
    return Scheduler(SchedulerConfig(**kwargs), limits, num_blocks)


def run_to_completion(scheduler, max_steps=10_000, steps_in_flight=1):
    """Drive the scheduler; with ``steps_in_flight=2`` step N+1 is scheduled (and run by
    the simulated worker, which feeds its own samples) before step N's output is applied,
    as the pipelined step loop of the scheduler service does."""
    bm = scheduler.block_manager
    runner = SimulatedRunner(bm.block_size, bm.num_blocks)
    outputs, reasons = {}, {}
    in_flight = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests() and not in_flight:
            break
        if len(in_flight) < steps_in_flight:
            out = scheduler.schedule()
            assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
            assert len(out.num_scheduled_tokens) <= scheduler.config.max_num_seqs
            if not out.is_empty or out.finished_req_ids:
                in_flight.append((out, runner.execute_model(out)))
                continue
        assert in_flight, "nothing scheduled and nothing in flight"
        out, result = in_flight.pop(0)
        for update in scheduler.update_from_output(out, result):
            outputs.setdefault(update.req_id, []).extend(update.new_token_ids)
            if update.finished:
                reasons[update.req_id] = update.finish_reason.value
    assert not scheduler.has_unfinished_requests(), "requests left unfinished"
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    return outputs, reasons


PROMPTS = [list(range(1, 30)), list(range(1, 20)) + [77] * 5, [5, 6, 7], list(range(40, 90)),
           list(range(1, 30)) + [9, 9]]


def add_all(scheduler, max_tokens=12, **params):
    for i, prompt in enumerate(PROMPTS):
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, **params), arrival_time=float(i)))


@pytest.mark.parametrize("steps_in_flight", [1, 2])
@pytest.mark.parametrize("config", [
    dict(),
    dict(max_num_batched_tokens=7),                       # tiny chunks
    dict(max_num_seqs=1),                                 # one request at a time
    dict(enable_prefix_caching=False),
    dict(num_blocks=20, max_num_batched_tokens=64),       # forces preemption
    dict(num_blocks=20, block_size=8, max_num_batched_tokens=5),
    dict(scheduling_policy="priority", num_blocks=22),
])
def test_outputs_do_not_depend_on_scheduler_configuration(config, steps_in_flight):
    scheduler = make_scheduler(**config)
    add_all(scheduler)
    outputs, reasons = run_to_completion(scheduler, steps_in_flight=steps_in_flight)
    for i, prompt in enumerate(PROMPTS):
        assert outputs[f"r{i}"] == expected_output(prompt, 12), f"r{i} under {config}"
        assert reasons[f"r{i}"] == "length"


@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_small_pool_preempts_and_recomputes(steps_in_flight):
    scheduler = make_scheduler(num_blocks=20, max_num_batched_tokens=64)
    add_all(scheduler)
    run_to_completion(scheduler, steps_in_flight=steps_in_flight)
    assert scheduler.num_preemptions > 0


def test_chunked_prefill_respects_token_budget_and_one_rule():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    scheduler.add_request(Request("long", list(range(1, 26)), SamplingParams(max_tokens=2)))
    steps = []
    runner = SimulatedRunner(4, 64)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        steps.append(out.num_scheduled_tokens.get("long"))
        scheduler.update_from_output(out, runner.execute_model(out))
    assert steps == [10, 10, 5, 1]


def test_prefix_hit_skips_cached_tokens():
    scheduler = make_scheduler()
    shared = list(range(1, 18))  # 4 full blocks of 4
    scheduler.add_request(Request("a", shared + [1], SamplingParams(max_tokens=1)))
    run_to_completion(scheduler)
    scheduler.add_request(Request("b", shared + [2, 3], SamplingParams(max_tokens=1)))
    out = scheduler.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 16
    assert out.num_scheduled_tokens["b"] == 3


def test_priority_policy_runs_lower_value_first_and_arrival_breaks_ties():
    scheduler = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    for name, prio, t in [("low", 5, 0.0), ("high", 0, 1.0), ("mid_late", 2, 3.0),
                          ("mid_early", 2, 2.0)]:
        scheduler.add_request(Request(name, [1, 2, 3], SamplingParams(max_tokens=1),
                                      priority=prio, arrival_time=t))
    order = []
    runner = SimulatedRunner(4, 64)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        order += [r.req_id for r in out.scheduled_new_reqs]
        scheduler.update_from_output(out, runner.execute_model(out))
    assert order == ["high", "mid_early", "mid_late", "low"]


def test_preemption_victim_is_lowest_priority_then_latest():
    scheduler = make_scheduler(num_blocks=6, block_size=4, scheduling_policy="priority")
    for name, prio, t in [("a", 0, 0.0), ("b", 1, 1.0), ("c", 1, 2.0)]:
        scheduler.add_request(Request(name, [1, 2, 3, 4, 5, 6, 7], SamplingParams(
            max_tokens=20, ignore_eos=True), priority=prio, arrival_time=t))
    runner = SimulatedRunner(4, 6)
    preempted = []
    while not preempted:
        out = scheduler.schedule()
        preempted = [r for r in ("a", "b", "c")
                     if scheduler.requests[r].status == RequestStatus.PREEMPTED]
        scheduler.update_from_output(out, runner.execute_model(out))
    assert preempted == ["c"]


def test_abort_frees_blocks_and_tells_the_runner():
    scheduler = make_scheduler()
    add_all(scheduler, max_tokens=50)
    runner = SimulatedRunner(4, 64)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute_model(out))
    assert scheduler.abort_requests(["r1", "r3", "missing"]) == ["r1", "r3"]
    out = scheduler.schedule()
    assert {"r1", "r3"} <= out.finished_req_ids
    assert "r1" not in out.num_scheduled_tokens
    scheduler.update_from_output(out, runner.execute_model(out))
    scheduler.abort_requests(list(scheduler.requests))
    scheduler.update_from_output(scheduler.schedule(), ModelRunnerOutput())
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_abort_while_step_in_flight_drops_its_output():
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=5)))
    runner = SimulatedRunner(4, 64)
    out = scheduler.schedule()
    result = runner.execute_model(out)
    scheduler.abort_requests(["a"])
    assert scheduler.update_from_output(out, result) == []
    assert scheduler.block_manager.num_free_blocks == 64


def stop_run(params, prompt=(1, 2, 3), eos=None, max_model_len=256, steps_in_flight=1):
    scheduler = make_scheduler(max_model_len=max_model_len)
    scheduler.add_request(Request("a", list(prompt), params, eos_token_id=eos))
    outputs, reasons = run_to_completion(scheduler, steps_in_flight=steps_in_flight)
    return outputs["a"], reasons["a"], scheduler


@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_pipelined_stops_are_exact(steps_in_flight):
    free_run = expected_output([1, 2, 3], 10)
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=10), eos=free_run[3],
                                 steps_in_flight=steps_in_flight)
    assert tokens == free_run[:4] and reason == "stop"
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=7, ignore_eos=True),
                                 steps_in_flight=steps_in_flight)
    assert tokens == free_run[:7] and reason == "length"
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=None), max_model_len=8,
                                 steps_in_flight=steps_in_flight)
    assert len(tokens) == 5 and reason == "length"


def test_pipelined_abort_with_a_step_in_flight_frees_everything():
    scheduler = make_scheduler()
    add_all(scheduler, max_tokens=30)
    runner = SimulatedRunner(4, 64)
    first = scheduler.schedule()
    first_result = runner.execute_model(first)
    second = scheduler.schedule()  # sent before the first step's answer
    # Every prompt finished its prefill in step 1: step 2 decodes their (unknown) samples.
    assert second.num_scheduled_tokens == {f"r{i}": 1 for i in range(len(PROMPTS))}
    second_result = runner.execute_model(second)
    scheduler.update_from_output(first, first_result)
    scheduler.abort_requests(["r0", "r2"])
    updates = scheduler.update_from_output(second, second_result)
    assert {u.req_id for u in updates}.isdisjoint({"r0", "r2"})
    assert {"r0", "r2"} <= scheduler.schedule().finished_req_ids
    scheduler.abort_requests(list(scheduler.requests))
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_stop_on_eos_unless_ignored_and_min_tokens():
    free_run = expected_output([1, 2, 3], 10)
    eos = free_run[3]
    assert eos not in free_run[:3]
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=10), eos=eos)
    assert tokens == free_run[:4] and reason == "stop"
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=10, ignore_eos=True), eos=eos)
    assert tokens == free_run and reason == "length"
    # min_tokens: EOS before it does not stop (the real sampler also masks it).
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=10, min_tokens=5), eos=eos)
    assert len(tokens) >= 5


def test_stop_token_ids_and_max_model_len():
    free_run = expected_output([1, 2, 3], 10)
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=10, stop_token_ids=[free_run[2]]))
    assert tokens == free_run[:3] and reason == "stop"
    tokens, reason, _ = stop_run(SamplingParams(max_tokens=None), max_model_len=8)
    assert len(tokens) == 5 and reason == "length"


@pytest.mark.parametrize("prompt, message", [
    ([], "must not be empty"),
    (list(range(256)), "max_model_len"),
])
def test_bad_prompts_raise_value_error(prompt, message):
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(Request("a", prompt, SamplingParams()))
    assert not scheduler.has_unfinished_requests()


def test_prompt_larger_than_the_pool_is_rejected():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(Request("a", list(range(1, 12)), SamplingParams()))


def test_duplicate_request_id_is_rejected():
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", [1], SamplingParams()))
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add_request(Request("a", [2], SamplingParams()))


def test_limits_come_from_the_runner_and_are_checked_against_the_budgets():
    scheduler = make_scheduler(num_blocks=10, block_size=8, max_model_len=40)
    assert (scheduler.max_model_len, scheduler.block_size,
            scheduler.block_manager.num_blocks) == (40, 8, 10)
    # Without chunked prefill a whole prompt of max_model_len must fit one step's budget.
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least "
                                         "max_model_len=40 without chunked prefill"):
        make_scheduler(max_model_len=40, max_num_batched_tokens=32,
                       enable_chunked_prefill=False)
    make_scheduler(max_model_len=32, max_num_batched_tokens=32, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="num_kv_blocks must be at least 1"):
        make_scheduler(num_blocks=0)
