"""from_pb / to_pb round trips between protobuf and the engine dataclasses."""

from __future__ import annotations

import pytest

from gridllm.common import convert
from gridllm.common.contract import (
    CachedRequestData,
    FinishReason,
    ModelLimits,
    ModelRunnerOutput,
    NewRequestData,
    RequestUpdate,
    SchedulerOutput,
    TokenLogprobs,
)
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams
from gridllm.v1 import generate_pb2, scheduler_pb2, worker_pb2


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.0, max_tokens=None, seed=7, stop=["\n", "END"],
                   stop_token_ids=[3, 4], ignore_eos=True, min_tokens=2, logprobs=3,
                   prompt_logprobs=0, skip_special_tokens=False,
                   include_stop_str_in_output=True),
    SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, presence_penalty=0.5,
                   frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={5: 2.5, 9: -100},
                   allowed_token_ids=[5, 9, 11], logits_processors=["no_repeat_ngram"],
                   extra_args={"no_repeat_ngram_size": 3, "name": "x", "ratio": 0.25}),
])
def test_sampling_params_round_trip(params):
    again = convert.sampling_params_from_pb(convert.sampling_params_to_pb(params))
    assert again == params
    assert isinstance((again.extra_args or {}).get("no_repeat_ngram_size", 0), int)


@pytest.mark.parametrize("structured", [
    StructuredOutputsParams(json={"type": "object", "properties": {"b": {"type": "string"},
                                                                   "a": {"enum": [1, 2]}}}),
    StructuredOutputsParams(json='{"type": "array"}', disable_any_whitespace=True),
    StructuredOutputsParams(regex=r"\d{3}-[a-z]+"),
    StructuredOutputsParams(choice=["yes", "no", "ünï \"q\""]),
    StructuredOutputsParams(grammar='root ::= "a" | "b"'),
    StructuredOutputsParams(json_object=True),
])
def test_structured_outputs_round_trip(structured):
    params = SamplingParams(structured_outputs=structured)
    again = convert.sampling_params_from_pb(convert.sampling_params_to_pb(params))
    assert again == params
    assert again.structured_outputs.cache_key == structured.cache_key
    if structured.json is not None:  # the schema's key order survives (it orders the output)
        assert list(again.structured_outputs.json) == list(structured.json)


@pytest.mark.parametrize("field,msg", [
    ("structured_outputs must set one of", generate_pb2.StructuredOutputs()),
    ("structured_outputs.json", generate_pb2.StructuredOutputs(json="{not json")),
    ("structured_outputs must set exactly one",
     generate_pb2.StructuredOutputs(json_object=False)),
    ("structured_outputs.choice", generate_pb2.StructuredOutputs(
        choice=generate_pb2.StringList())),
])
def test_bad_structured_outputs_raise_naming_the_field(field, msg):
    with pytest.raises(ValueError, match=f"^{field}"):
        convert.sampling_params_from_pb(generate_pb2.SamplingParams(structured_outputs=msg))


def test_absent_fields_take_the_python_defaults():
    assert convert.sampling_params_from_pb(generate_pb2.SamplingParams()) == SamplingParams()
    assert convert.sampling_params_from_pb(None) == SamplingParams()


@pytest.mark.parametrize("field,msg", [
    ("temperature", generate_pb2.SamplingParams(temperature=-0.5)),
    ("top_k", generate_pb2.SamplingParams(top_k=-3)),
    ("min_tokens", generate_pb2.SamplingParams(max_tokens=2, min_tokens=5)),
    ("stop_token_ids", generate_pb2.SamplingParams(stop_token_ids=[-1])),
])
def test_bad_values_raise_naming_the_field(field, msg):
    with pytest.raises(ValueError, match=field):
        convert.sampling_params_from_pb(msg)


def test_scheduler_output_round_trip_keeps_the_batch_order():
    params = SamplingParams(temperature=0.0, logprobs=1)
    out = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("n1", [1, 2, 3], params, [7], [4, 5], 0)],
        scheduled_cached_reqs=[CachedRequestData("c1", [9], 12), CachedRequestData("c2", [], 3)],
        num_scheduled_tokens={"c1": 1, "c2": 1, "n1": 4}, total_num_scheduled_tokens=6,
        finished_req_ids={"gone", "old"})
    again = convert.scheduler_output_from_pb(convert.scheduler_output_to_pb(out, step_id=3))
    assert again == out
    assert list(again.num_scheduled_tokens) == list(out.num_scheduled_tokens)


def test_runner_output_and_request_update_round_trip():
    lp = TokenLogprobs([5, 2], [-0.25, -1.5], [1, 2])
    out = ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids={"a": [5], "b": [8]},
                            logprobs={"a": [lp]}, prompt_logprobs={"c": [lp, lp]})
    assert convert.runner_output_from_pb(convert.runner_output_to_pb(out, 1)) == out
    for update in (RequestUpdate("a", [5], [lp], None, None, None, 4),
                   RequestUpdate("b", [1], None, [lp], FinishReason.STOP, 1, 0),
                   RequestUpdate("c", finish_reason=FinishReason.ABORT)):
        assert convert.request_update_from_pb(convert.request_update_to_pb(update)) == update


# ----------------------------------------------------------------------- field parity
# Deliberate differences between the dataclass and the proto message, each with its reason.
# Proto-only: proto3 `optional` cannot say "unset means None" for max_tokens next to
# "unset means the default 16"; unbounded_max_tokens=true is SamplingParams.max_tokens=None.
PROTO_ONLY_FIELDS = {"unbounded_max_tokens"}
# Dataclass-only: none (every SamplingParams field travels to the scheduler and workers).
DATACLASS_ONLY_FIELDS: set[str] = set()

# One value other than the default per SamplingParams field.
NON_DEFAULT_VALUES = {
    "n": 3, "temperature": 0.5, "top_p": 0.8, "top_k": 7, "min_p": 0.1,
    "presence_penalty": 0.3, "frequency_penalty": -0.3, "repetition_penalty": 1.1, "seed": 11,
    "stop": ["STOP"], "stop_token_ids": [8], "ignore_eos": True, "max_tokens": 5,
    "min_tokens": 1, "logprobs": 2, "prompt_logprobs": 1, "skip_special_tokens": False,
    "include_stop_str_in_output": True, "logit_bias": {4: 1.5}, "allowed_token_ids": [4, 6],
    "logits_processors": ["no_repeat_ngram"], "extra_args": {"no_repeat_ngram_size": 2},
    "structured_outputs": StructuredOutputsParams(choice=["yes", "no"]),
}


def _dataclass_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(SamplingParams)}


def test_every_sampling_params_field_has_a_proto_counterpart_and_back():
    proto_fields = {f.name for f in generate_pb2.SamplingParams.DESCRIPTOR.fields}
    dataclass_fields = _dataclass_fields()
    assert dataclass_fields - proto_fields == DATACLASS_ONLY_FIELDS, \
        "SamplingParams fields missing from protos/gridllm/v1/generate.proto"
    assert proto_fields - dataclass_fields == PROTO_ONLY_FIELDS, \
        "proto SamplingParams fields missing from gridllm.common.sampling_params"


@pytest.mark.parametrize("name", sorted(_dataclass_fields()))
def test_each_sampling_params_field_survives_the_wire(name):
    assert set(NON_DEFAULT_VALUES) == _dataclass_fields(), "add a value for the new field"
    params = SamplingParams(**{name: NON_DEFAULT_VALUES[name]})
    assert getattr(params, name) != getattr(SamplingParams(), name)
    assert convert.sampling_params_from_pb(convert.sampling_params_to_pb(params)) == params


# ----------------------------------------------------------------------- ModelLimits
@pytest.mark.parametrize("eos", [None, 0, 2])
@pytest.mark.parametrize("message", [worker_pb2.WorkerInfo, scheduler_pb2.SchedulerInfo,
                                     generate_pb2.GetModelInfoResponse])
def test_model_limits_round_trip_through_each_info_message(message, eos):
    limits = ModelLimits(max_model_len=300, vocab_size=320, block_size=8, eos_token_id=eos)
    msg = convert.model_limits_to_pb(limits, message())
    assert msg.HasField("eos_token_id") == (eos is not None)
    assert convert.model_limits_from_pb(msg) == limits
    # Writing limits without an EOS clears one written before.
    cleared = convert.model_limits_to_pb(ModelLimits(300, 320, 8), msg)
    assert not cleared.HasField("eos_token_id")


def test_the_kv_window_travels_from_worker_to_scheduler():
    limits = ModelLimits(max_model_len=300, vocab_size=320, block_size=8, kv_window=12)
    msg = convert.model_limits_to_pb(limits, worker_pb2.WorkerInfo())
    assert msg.kv_window == 12 and convert.model_limits_from_pb(msg) == limits
    # 0 on the wire is "no window on some layer".
    assert convert.model_limits_from_pb(worker_pb2.WorkerInfo(block_size=8)).kv_window is None


def test_kv_groups_travel_from_worker_to_scheduler_and_back():
    limits = ModelLimits(max_model_len=300, vocab_size=320, block_size=8,
                         kv_group_windows=(0, 6, 6))
    msg = convert.model_limits_to_pb(limits, worker_pb2.WorkerInfo())
    again = convert.model_limits_from_pb(msg)
    assert again == limits and again.group_windows == (None, 6, 6)
    assert ModelLimits(300, 320, 8, kv_window=12).group_windows == (12,)
    out = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("a", [1, 2], SamplingParams(), [], [3], 0,
                                           [[4], [5]])],
        scheduled_cached_reqs=[CachedRequestData("b", [6], 8, [[7], []])],
        num_scheduled_tokens={"b": 1, "a": 2}, total_num_scheduled_tokens=3)
    back = convert.scheduler_output_from_pb(convert.scheduler_output_to_pb(out))
    assert back.scheduled_new_reqs[0].group_block_ids == [[4], [5]]
    assert back.scheduled_cached_reqs[0].new_group_block_ids == [[7], []]
