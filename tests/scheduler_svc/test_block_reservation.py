"""Length-aware admission: the predictors, the reservation rule and its effect on a
KV-constrained workload (against the contract-checking simulated runner)."""

import random

import pytest

from gridllm.common.config import SchedulerConfig
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.block_reservation import BlockReservation
from scheduler_svc.length_predictor import (
    OnlinePredictor,
    PromptHeuristicPredictor,
    max_tokens_bucket,
)
from scheduler_svc.request import Request, RequestStatus
from tests.scheduler_svc.test_scheduler import (
    PROMPTS,
    SimulatedRunner,
    add_all,
    expected_output,
    make_scheduler,
    run_to_completion,
)


def finished(prompt, num_output, max_tokens=256, status=RequestStatus.FINISHED_STOPPED):
    request = Request("x", list(prompt), SamplingParams(max_tokens=max_tokens))
    request.output_token_ids = [7] * num_output
    request.status = status
    return request


# ----------------------------------------------------------------- predictors
def test_heuristic_predicts_a_fixed_allowance():
    assert PromptHeuristicPredictor().predict(finished([1, 2], 0)) == 200
    assert PromptHeuristicPredictor(50).predict(finished([1, 2], 0)) == 50
    with pytest.raises(ValueError, match="num_output_tokens"):
        PromptHeuristicPredictor(0)


def test_max_tokens_buckets_are_powers_of_two():
    assert [max_tokens_bucket(n) for n in (None, 1, 2, 3, 4, 255, 256)] == [0, 1, 2, 2, 3, 8, 9]


def test_online_predictor_learns_per_template_then_bucket():
    predictor = OnlinePredictor(PromptHeuristicPredictor(200), template_tokens=4,
                                min_samples=3)
    short, long_ = [1, 1, 1, 1], [2, 2, 2, 2]
    # Two samples: not enough anywhere, the fallback answers.
    for n in (10, 12):
        predictor.observe(finished(short + [n], n))
    assert predictor.predict(finished(short + [99], 0)) == 200
    predictor.observe(finished(short + [5], 14))
    assert predictor.predict(finished(short + [99], 0)) == 12  # mean of 10, 12, 14
    for n in (100, 110, 121):
        predictor.observe(finished(long_ + [n], n))
    assert predictor.predict(finished(long_ + [3], 0)) == 111  # ceil(331 / 3)
    # An unseen template in the same max_tokens bucket gets the bucket's mean.
    assert predictor.predict(finished([9, 9, 9, 9], 0)) == 62  # ceil(467 / 6)
    # Another bucket has no samples yet.
    assert predictor.predict(finished(short, 0, max_tokens=16)) == 200


def test_online_predictor_forgets_old_samples_and_templates():
    predictor = OnlinePredictor(template_tokens=1, window=2, min_samples=1, max_templates=2)
    for n in (100, 10, 20):
        predictor.observe(finished([1], n))
    assert predictor.predict(finished([1], 0)) == 15  # only the last two samples
    predictor.observe(finished([2], 30))
    predictor.observe(finished([3], 40))  # evicts template [1], the least recently seen
    assert predictor.predict(finished([1], 0, max_tokens=8)) == 200  # fallback: other bucket
    assert len(predictor._by_template) == 2


@pytest.mark.parametrize("field, value", [("template_tokens", 0), ("window", 0),
                                          ("min_samples", 0), ("max_templates", 0)])
def test_online_predictor_rejects_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        OnlinePredictor(**{field: value})


@pytest.mark.parametrize("fields, message", [
    (dict(block_reservation="always"), "block_reservation must be one of"),
    (dict(prefetch_ratio=-0.1), "prefetch_ratio must be in"),
    (dict(prefetch_ratio="0.1"), "prefetch_ratio must be in"),
])
def test_config_rejects_bad_values_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**fields)


# ----------------------------------------------------------------- the reservation rule
def test_target_blocks_follow_prediction_slack_and_limits():
    reservation = BlockReservation(PromptHeuristicPredictor(20), block_size=4,
                                   max_model_len=64, prefetch_ratio=0.1)
    request = Request("r", list(range(10)), SamplingParams(max_tokens=100))
    assert reservation.target_blocks(request) == 9  # ceil((10 + 20) * 1.1 / 4) = ceil(33 / 4)
    request.sampling_params = SamplingParams(max_tokens=5)
    assert reservation.target_blocks(request) == 4  # max_tokens caps it: 15 tokens
    request.sampling_params = SamplingParams(max_tokens=100)
    request.output_token_ids = [3] * 30  # past its prediction: room for one more token
    assert reservation.target_blocks(request) == 12  # ceil(min(41 * 1.1, 64) / 4)
    request.output_token_ids = [3] * 53
    assert reservation.target_blocks(request) == 16  # max_model_len caps it


class _FixedPredictor:
    """Predicts each request's output length from a table (by req_id)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def predict(self, request):
        return self.lengths[request.req_id]

    def observe(self, request):
        pass


@pytest.mark.parametrize("seed", range(20))
def test_peak_blocks_bounds_the_stepwise_demand(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    requests, lengths = [], {}
    for i in range(rng.randint(1, 8)):
        request = Request(f"r{i}", [1] * rng.randint(1, 40),
                          SamplingParams(max_tokens=rng.randint(1, 60)))
        request.output_token_ids = [2] * rng.randint(0, request.sampling_params.max_tokens - 1)
        lengths[request.req_id] = rng.randint(1, 80)
        requests.append(request)
    reservation = BlockReservation(_FixedPredictor(lengths), block_size, max_model_len=512,
                                   prefetch_ratio=rng.choice([0.0, 0.1]))
    spans = [(r.num_tokens, reservation.target_tokens(r) - r.num_tokens) for r in requests]
    # Step by step: a request holds held + t tokens until it has produced its last one.
    demand = [sum(-(-(held + t) // block_size) for held, remaining in spans
                  if t < remaining or t == 0)
              for t in range(max(1, max(remaining for _, remaining in spans)))]
    peak = reservation.peak_blocks(requests)
    # Partly filled blocks are rounded up over the sum: at most one block per request more.
    assert max(demand) <= peak <= max(demand) + len(requests)
    if block_size == 1:
        assert peak == max(demand)


@pytest.mark.parametrize("predicted_c, admitted", [(8, True), (20, False)])
def test_admission_uses_the_peak_not_the_sum_of_final_sizes(predicted_c, admitted):
    block_manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    reservation = BlockReservation(_FixedPredictor({"a": 2, "b": 16, "c": predicted_c}),
                                   block_size=4, max_model_len=512, prefetch_ratio=0.0)
    running = [Request(name, [1] * 8, SamplingParams(max_tokens=100)) for name in "ab"]
    for request in running:
        assert block_manager.allocate_slots(request, 8) is not None
    new = Request("c", [1] * 4, SamplingParams(max_tokens=100))
    # Final sizes 3 + 6 + 3 blocks (12) exceed the 10-block pool either way, but "a" ends
    # after 2 tokens: with c predicted at 8 tokens the peak is 8 blocks, at 20 it is 12.
    assert sum(reservation.target_blocks(r) for r in [*running, new]) > 10
    assert reservation.peak_blocks([*running, new]) == (8 if admitted else 12)
    assert reservation.admits(new, [], running, block_manager) == admitted


def test_reservation_lets_nothing_starve():
    scheduler = make_scheduler(num_blocks=8, block_reservation="predicted")
    # Predicted far beyond the pool, but nothing else runs: admitted.
    scheduler.add_request(Request("big", list(range(1, 9)), SamplingParams(
        max_tokens=20, ignore_eos=True)))
    out = scheduler.schedule()
    assert "big" in out.num_scheduled_tokens


# ----------------------------------------------------------------- on the simulated runner
@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_reservation_avoids_the_preemptions_of_a_small_pool(steps_in_flight):
    plain = make_scheduler(num_blocks=20, max_num_batched_tokens=64)
    add_all(plain)
    run_to_completion(plain, steps_in_flight=steps_in_flight)
    assert plain.num_preemptions > 0
    reserved = make_scheduler(num_blocks=20, max_num_batched_tokens=64,
                              block_reservation="predicted")
    add_all(reserved)
    outputs, _ = run_to_completion(reserved, steps_in_flight=steps_in_flight)
    assert reserved.num_preemptions == 0
    for i, prompt in enumerate(PROMPTS):
        assert outputs[f"r{i}"] == expected_output(prompt, 12)


def test_wrong_predictions_still_preempt_lowest_priority_then_latest():
    scheduler = make_scheduler(num_blocks=6, block_size=4, scheduling_policy="priority",
                               block_reservation="predicted", prefetch_ratio=0.0)
    scheduler.reservation.predictor = PromptHeuristicPredictor(1)  # far too short
    for name, prio, t in [("a", 0, 0.0), ("b", 1, 1.0), ("c", 1, 2.0)]:
        scheduler.add_request(Request(name, [1, 2, 3, 4, 5, 6, 7], SamplingParams(
            max_tokens=20, ignore_eos=True), priority=prio, arrival_time=t))
    runner = SimulatedRunner(4, 6)
    preempted = []
    for _ in range(100):
        out = scheduler.schedule()
        preempted = [r for r in ("a", "b", "c")
                     if scheduler.requests[r].status == RequestStatus.PREEMPTED]
        scheduler.update_from_output(out, runner.execute_model(out))
        if preempted:
            break
    assert preempted == ["c"]


def _stop_prompts(num, offset):
    # Prompts that stop early on a stop token although max_tokens allows 200.
    prompts = [[offset + i, 3, 5, 7, 11, 13, 17, 19, 23][:5 + i % 4] for i in range(num)]
    stops = [expected_output(p, 6)[3] for p in prompts]
    return prompts, stops


def test_learnt_lengths_admit_more_requests_at_once():
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=64,
                               block_reservation="predicted")
    runner = SimulatedRunner(4, 64)
    concurrency = []
    for wave in range(2):
        prompts, stops = _stop_prompts(8, offset=100 * (wave + 1))
        for i, (prompt, stop) in enumerate(zip(prompts, stops, strict=True)):
            scheduler.add_request(Request(f"w{wave}-{i}", prompt, SamplingParams(
                max_tokens=200, stop_token_ids=[stop], ignore_eos=True)))
        outputs, most = {}, 0
        for _ in range(1000):
            if not scheduler.has_unfinished_requests():
                break
            out = scheduler.schedule()
            most = max(most, scheduler.num_running)
            for update in scheduler.update_from_output(out, runner.execute_model(out)):
                outputs.setdefault(update.req_id, []).extend(update.new_token_ids)
        concurrency.append(most)
        for i, (prompt, stop) in enumerate(zip(prompts, stops, strict=True)):
            want = expected_output(prompt, 6)
            assert outputs[f"w{wave}-{i}"] == want[:want.index(stop) + 1]
    # First wave: the 200-token fallback lets one request in at a time until four have
    # finished (the predictor's min_samples), then the last four run together on the
    # learnt lengths (at most 4 tokens each); the second wave runs all at once.
    assert concurrency[0] == 4
    assert concurrency[1] == 8
    assert scheduler.num_preemptions == 0
