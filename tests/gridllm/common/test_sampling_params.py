"""SamplingParams: vLLM's defaults and ranges, errors that name the field."""

import re

import pytest

from gridllm.common.sampling_params import SamplingParams

# vLLM's SamplingParams defaults (vllm/sampling_params.py), after its own normalisation.
VLLM_DEFAULTS = {
    "n": 1,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
    "logit_bias": None,
    "allowed_token_ids": None,
}


def test_defaults_match_vllm():
    params = SamplingParams()
    assert {name: getattr(params, name) for name in VLLM_DEFAULTS} == VLLM_DEFAULTS
    assert not params.is_greedy


OUT_OF_RANGE = [
    ("n", {"n": 0}),
    ("n", {"n": -1}),
    ("n", {"n": 1.5}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.01}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("presence_penalty", {"presence_penalty": 2.01}),
    ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": 2.01}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("seed", {"seed": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("stop", {"stop": ""}),
    ("stop", {"stop": ["ok", ""]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("allowed_token_ids", {"allowed_token_ids": []}),
    ("allowed_token_ids", {"allowed_token_ids": [3, -1]}),
    ("logit_bias", {"logit_bias": {-1: 1.0}}),
    ("logit_bias", {"logit_bias": {1: float("nan")}}),
]


@pytest.mark.parametrize(("field", "kwargs"), OUT_OF_RANGE,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_raises_naming_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0}, {"top_p": 1e-3}, {"top_k": -1}, {"top_k": 1}, {"min_p": 1.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0}, {"repetition_penalty": 5.0},
    {"max_tokens": None, "min_tokens": 100}, {"min_tokens": 4, "max_tokens": 4},
    {"logprobs": 0}, {"prompt_logprobs": 0}, {"seed": -3},
])
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    params = SamplingParams(stop="###", logit_bias={"5": 250, 6: -1000, 7: 0.5},
                            allowed_token_ids=(1, 2))
    assert params.stop == ["###"]
    assert params.logit_bias == {5: 100.0, 6: -100.0, 7: 0.5}
    assert params.allowed_token_ids == [1, 2]
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert greedy.is_greedy
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)


def test_clone_revalidates():
    params = SamplingParams(temperature=0.5, stop=["x"])
    clone = params.clone(seed=7)
    assert clone.seed == 7 and clone.temperature == 0.5 and clone.stop == ["x"]
    with pytest.raises(ValueError, match="^top_p "):
        params.clone(top_p=0.0)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("stop_token_ids", {"stop_token_ids": [3, 10]}),
    ("allowed_token_ids", {"allowed_token_ids": [10]}),
    ("logit_bias", {"logit_bias": {10: 1.0}}),
    ("logprobs", {"logprobs": 11}),
    ("prompt_logprobs", {"prompt_logprobs": 11}),
])
def test_verify_vocab_rejects_ids_outside_vocab(field, kwargs):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=rf"^{field} "):
        params.verify_vocab(10)


def test_verify_vocab_accepts_last_id():
    SamplingParams(stop_token_ids=[9], allowed_token_ids=[0, 9], logit_bias={9: 1.0},
                   logprobs=10, prompt_logprobs=10).verify_vocab(10)


@pytest.mark.parametrize("name,value", [
    ("stop_token_ids", ["a"]), ("n", "2"), ("temperature", "hot"), ("top_k", 1.5),
    ("logit_bias", {"a": 1}), ("logit_bias", [1]), ("max_tokens", "5"), ("stop", 5),
    ("allowed_token_ids", "abc"), ("logprobs", True), ("extra_args", [1]),
    ("logits_processors", "x"), ("ignore_eos", "yes"), ("temperature", float("nan")),
    ("top_p", float("inf")), ("min_tokens", None), ("prompt_logprobs", 2.0),
])
def test_wrong_type_raises_type_error_naming_field(name, value):
    with pytest.raises(TypeError, match=f"^{name} must be") as info:
        SamplingParams(**{name: value})
    # To the services a wrong type is a bad argument like an out-of-range value.
    assert isinstance(info.value, ValueError)


def test_token_id_keys_may_be_decimal_strings():
    # JSON objects (the OpenAI API's logit_bias) key token ids by strings.
    assert SamplingParams(logit_bias={"12": 5}).logit_bias == {12: 5.0}
