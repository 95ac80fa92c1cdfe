"""RequestLimits and the context check of max_tokens: each bound refuses one past it, names the
field and the limit, and lets the bound itself through."""

from __future__ import annotations

import dataclasses

import pytest

from gridllm.common.config import RequestLimits, SchedulerConfig
from gridllm.common.convert import (
    check_max_tokens,
    request_limits_from_pb,
    request_limits_to_pb,
    sampling_params_from_pb,
    sampling_params_to_pb,
)
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, scheduler_pb2

LIMITS = RequestLimits(max_n=4, max_logprobs=3, max_num_stop_strings=2, max_stop_string_len=5,
                       max_num_stop_token_ids=3, max_num_logit_bias=2)

# (field, limit name, params at the limit, params one past it)
CASES = [
    ("n", "max_n", dict(n=4), dict(n=5)),
    ("logprobs", "max_logprobs", dict(logprobs=3), dict(logprobs=4)),
    ("prompt_logprobs", "max_logprobs", dict(prompt_logprobs=3), dict(prompt_logprobs=4)),
    ("stop", "max_num_stop_strings", dict(stop=["a", "b"]), dict(stop=["a", "b", "c"])),
    ("stop", "max_stop_string_len", dict(stop=["abcde"]), dict(stop=["abcdef"])),
    ("stop_token_ids", "max_num_stop_token_ids", dict(stop_token_ids=[1, 2, 3]),
     dict(stop_token_ids=[1, 2, 3, 4])),
    ("logit_bias", "max_num_logit_bias", dict(logit_bias={1: 1.0, 2: 1.0}),
     dict(logit_bias={1: 1.0, 2: 1.0, 3: 1.0})),
]


@pytest.mark.parametrize("field,limit_name,ok,bad", CASES, ids=[c[1] for c in CASES])
def test_each_limit_names_the_field_and_the_limit(field, limit_name, ok, bad):
    LIMITS.check(SamplingParams(**ok))
    with pytest.raises(ValueError, match=rf"^{field}\b.*\({limit_name}\)"):
        LIMITS.check(SamplingParams(**bad))


@pytest.mark.parametrize("field,limit_name,ok,bad", CASES, ids=[c[1] for c in CASES])
def test_limits_are_checked_on_the_message_before_it_is_copied(field, limit_name, ok, bad):
    # The message has SamplingParams' field names: a list is measured before it is built.
    sampling_params_from_pb(sampling_params_to_pb(SamplingParams(**ok)), LIMITS)
    with pytest.raises(ValueError, match=rf"^{field}\b.*\({limit_name}\)"):
        sampling_params_from_pb(sampling_params_to_pb(SamplingParams(**bad)), LIMITS)


def test_a_limit_must_be_a_positive_integer():
    for name in [f.name for f in dataclasses.fields(RequestLimits)]:
        with pytest.raises(ValueError, match=rf"^{name} must be an integer of at least 1"):
            RequestLimits(**{name: 0})
        with pytest.raises(ValueError, match=rf"^{name} must be an integer"):
            SchedulerConfig(**{name: 1.5})


def test_scheduler_config_carries_the_limits_and_the_proto_round_trips_them():
    config = SchedulerConfig(**dataclasses.asdict(LIMITS))
    assert config.request_limits() == LIMITS
    assert SchedulerConfig().request_limits() == RequestLimits()
    assert request_limits_from_pb(request_limits_to_pb(LIMITS)) == LIMITS
    # A scheduler that reports none (an older one) means the defaults.
    assert request_limits_from_pb(scheduler_pb2.RequestLimits()) == RequestLimits()


def test_vllm_defaults_for_the_limits_vllm_has():
    assert RequestLimits().max_logprobs == 20


def test_max_tokens_past_the_context_names_max_tokens():
    SamplingParams(max_tokens=24).verify_max_tokens(40, 64)
    SamplingParams(max_tokens=None).verify_max_tokens(63, 64)
    with pytest.raises(ValueError, match=r"^max_tokens must be at most 24 for this prompt: "
                                         r"the prompt has 40 tokens and max_model_len is 64, "
                                         r"got 25\.$"):
        SamplingParams(max_tokens=25).verify_max_tokens(40, 64)


def test_an_unset_max_tokens_is_cut_to_fit_and_a_set_one_is_refused():
    unset = generate_pb2.SamplingParams(temperature=0.5)
    params = sampling_params_from_pb(unset)
    assert params.max_tokens == 16
    assert check_max_tokens(params, unset, 60, 64).max_tokens == 4
    assert check_max_tokens(params, None, 60, 64).max_tokens == 4
    assert check_max_tokens(params, unset, 10, 64) is params
    explicit = generate_pb2.SamplingParams(max_tokens=16)
    with pytest.raises(ValueError, match=r"^max_tokens must be at most 4"):
        check_max_tokens(sampling_params_from_pb(explicit), explicit, 60, 64)
    unbounded = generate_pb2.SamplingParams(unbounded_max_tokens=True)
    assert check_max_tokens(sampling_params_from_pb(unbounded), unbounded, 63,
                            64).max_tokens is None
    # min_tokens that no longer fits is refused rather than silently lowered.
    with_min = generate_pb2.SamplingParams(min_tokens=8)
    with pytest.raises(ValueError, match=r"^max_tokens must be at most 4"):
        check_max_tokens(sampling_params_from_pb(with_min), with_min, 60, 64)


def test_token_id_lists_longer_than_the_vocabulary_are_refused():
    SamplingParams(allowed_token_ids=list(range(10))).verify_vocab(10)
    with pytest.raises(ValueError, match=r"^allowed_token_ids must have at most one entry "
                                         r"per token of the vocabulary \(10\), got 11\."):
        SamplingParams(allowed_token_ids=[1] * 11).verify_vocab(10)
    with pytest.raises(ValueError, match=r"^stop_token_ids must have at most one entry"):
        SamplingParams(stop_token_ids=[1] * 11).verify_vocab(10)


def test_a_logits_processor_named_twice_is_refused():
    SamplingParams(logits_processors=["a", "b"])
    with pytest.raises(ValueError, match=r"^logits_processors must name each processor at "
                                         r"most once"):
        SamplingParams(logits_processors=["a", "a"])


def test_seeds_stay_64_bit_for_every_completion():
    SamplingParams(seed=2**63 - 1)
    SamplingParams(n=3, seed=2**63 - 3)
    SamplingParams(seed=-(2**63))
    for kwargs in (dict(seed=2**63), dict(seed=-(2**63) - 1), dict(n=2, seed=2**63 - 1)):
        with pytest.raises(ValueError, match=r"^seed must be in \["):
            SamplingParams(**kwargs)
