"""StructuredOutputsParams: vLLM's names, exactly one kind, errors that name the field."""

import pytest

from gridllm import SamplingParams, StructuredOutputsParams
from gridllm.common.structured_outputs import MAX_SPEC_CHARS


@pytest.mark.parametrize("kwargs,kind", [
    ({"json": {"type": "object"}}, "json"),
    ({"json": '{"type": "string"}'}, "json"),
    ({"regex": "[a-z]+"}, "regex"),
    ({"choice": ("yes", "no")}, "choice"),
    ({"grammar": 'root ::= "x"'}, "grammar"),
    ({"json_object": True}, "json_object"),
])
def test_each_kind(kwargs, kind):
    params = StructuredOutputsParams(**kwargs)
    assert params.kind == kind
    if kind == "json":
        assert isinstance(params.json, dict)  # JSON text is parsed once, here
    if kind == "choice":
        assert params.choice == ["yes", "no"]


@pytest.mark.parametrize("kwargs,match", [
    ({}, "^structured_outputs must set exactly one"),
    ({"json_object": False}, "^structured_outputs must set exactly one"),
    ({"regex": "a", "choice": ["a"]}, "^structured_outputs must set exactly one"),
    ({"json": "{oops"}, "^structured_outputs.json must be a JSON schema"),
    ({"json": "[1, 2]"}, "^structured_outputs.json must be a JSON object"),
    ({"json": 5}, "^structured_outputs.json must be"),
    ({"choice": []}, "^structured_outputs.choice must list"),
    ({"choice": ["a", 1]}, "^structured_outputs.choice must be a list of strings"),
    ({"regex": "  "}, "^structured_outputs.regex must not be empty"),
    ({"grammar": 3}, "^structured_outputs.grammar must be a string"),
    ({"json_object": "yes"}, "^structured_outputs.json_object must be a bool"),
    ({"regex": "a" * (MAX_SPEC_CHARS + 1)}, "^structured_outputs.regex must be at most"),
])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_takes_the_object_or_a_dict():
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=["a", "b"])
    assert params.clone(seed=1).structured_outputs == params.structured_outputs
    with pytest.raises(TypeError, match="^structured_outputs must be") as info:
        SamplingParams(structured_outputs="json")
    assert isinstance(info.value, ValueError)  # a bad argument to the services
    with pytest.raises(ValueError, match=r"^structured_outputs.regexp is not a structured"):
        SamplingParams(structured_outputs={"regexp": "a"})


def test_cache_key_follows_the_spec():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {}, "y": {}}})
    same = StructuredOutputsParams(json='{"type": "object", "properties": {"x": {}, "y": {}}}')
    reordered = StructuredOutputsParams(json={"properties": {"y": {}, "x": {}},
                                              "type": "object"})
    assert a.cache_key == same.cache_key
    assert a.cache_key != reordered.cache_key  # property order orders the output
    compact = StructuredOutputsParams(json=a.json, disable_any_whitespace=True)
    assert a.cache_key != compact.cache_key


def test_from_dict_names_the_given_field():
    with pytest.raises(ValueError, match=r"^response_format.json_schema.json must be"):
        StructuredOutputsParams.from_dict({"json": "[]"}, "response_format.json_schema")
