"""The shared step loop (StepPipeline) against the contract-checking simulated runner, whose
answers are read only after the next step was handed to it, as the engine and the worker
service read a device's output."""

import pytest

from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.request import Request
from scheduler_svc.step_pipeline import StepPipeline
from tests.scheduler_svc.test_scheduler import (
    PROMPTS,
    SimulatedRunner,
    add_all,
    expected_output,
    make_scheduler,
)


class _LateAnswer:
    """A runner output read after the fact (the simulated runner already computed it)."""

    def __init__(self, output):
        self.output = output
        self.num_reads = 0

    def get_output(self):
        self.num_reads += 1
        return self.output


def drive(scheduler, max_steps_in_flight, max_iterations=10_000):
    """The loop of ``StepPipeline``'s docstring; returns outputs, reasons and the most
    steps ever in flight."""
    bm = scheduler.block_manager
    runner = SimulatedRunner(bm.block_size, bm.num_blocks)
    pipeline = StepPipeline(scheduler, max_steps_in_flight)
    outputs, reasons, most_in_flight = {}, {}, 0
    for _ in range(max_iterations):
        step = pipeline.schedule_next()
        if step is not None:
            step.handle = _LateAnswer(runner.execute_model(step.output))
            most_in_flight = max(most_in_flight, pipeline.num_in_flight)
            continue
        if not pipeline.num_in_flight:
            break
        _, updates = pipeline.complete(pipeline.oldest().handle.get_output())
        for update in updates:
            outputs.setdefault(update.req_id, []).extend(update.new_token_ids)
            if update.finished:
                reasons[update.req_id] = update.finish_reason.value
    assert not scheduler.has_unfinished_requests(), "requests left unfinished"
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    return outputs, reasons, most_in_flight


@pytest.mark.parametrize("max_steps_in_flight", [1, 2])
@pytest.mark.parametrize("config", [
    dict(),
    dict(max_num_batched_tokens=7),
    dict(num_blocks=20, max_num_batched_tokens=64),       # forces preemption
    dict(scheduling_policy="priority", num_blocks=22),
    dict(enable_prefix_caching=False, max_num_seqs=2),
])
def test_pipeline_outputs_do_not_depend_on_overlap(config, max_steps_in_flight):
    scheduler = make_scheduler(**config)
    add_all(scheduler)
    outputs, reasons, most_in_flight = drive(scheduler, max_steps_in_flight)
    assert most_in_flight == max_steps_in_flight
    for i, prompt in enumerate(PROMPTS):
        assert outputs[f"r{i}"] == expected_output(prompt, 12), f"r{i} under {config}"
        assert reasons[f"r{i}"] == "length"


def test_pipeline_stops_exactly_with_a_step_in_flight():
    free_run = expected_output([1, 2, 3], 10)
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=10),
                                  eos_token_id=free_run[3]))
    outputs, reasons, _ = drive(scheduler, 2)
    assert outputs["a"] == free_run[:4] and reasons["a"] == "stop"


def test_pipeline_rejects_other_depths_and_forgets_unsent_steps():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="max_steps_in_flight"):
        StepPipeline(scheduler, 3)
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=2)))
    pipeline = StepPipeline(scheduler, 2)
    step = pipeline.schedule_next()
    assert step is not None and pipeline.num_in_flight == 1
    pipeline.discard(step)
    assert pipeline.num_in_flight == 0
