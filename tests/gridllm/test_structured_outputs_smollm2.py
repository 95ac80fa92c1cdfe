"""Structured outputs on real weights (SmolLM2-135M-Instruct on the CPU): sampled outputs
always parse, greedy outputs keep the model's choice where it already fits the grammar, and
unconstrained requests in the same batch are untouched."""

from __future__ import annotations

import json
import re

import pytest

from gridllm import LLM, SamplingParams, StructuredOutputsParams
from gridllm.common.presets import is_preset_available

jsonschema = pytest.importorskip("jsonschema")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                       reason="smollm2-135m is not in the cache (make test fetches it)"),
]

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "species": {"enum": ["cat", "dog", "parrot"]},
        "age": {"type": "integer"},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 16},
                                 "is_adult": {"type": "boolean"}},
                  "required": ["name", "is_adult"], "additionalProperties": False},
    },
    "required": ["name", "species", "age", "toys", "owner"],
    "additionalProperties": False,
}
PET_CHAT = [{"role": "user", "content": "Describe a pet as a JSON object with name, species, "
                                        "age, toys and owner."}]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", max_model_len=512, num_kv_blocks=512)


def _chat_ids(llm, content: str) -> dict:
    from gridllm.common.tokenizer import apply_chat_template

    return {"prompt_token_ids": apply_chat_template(
        llm.get_tokenizer(), [{"role": "user", "content": content}])}


def test_sampled_json_always_validates_against_its_schema(llm):
    # Compact separators: with any whitespace allowed, a 135M model at temperature 1 can
    # spend its whole budget on whitespace runs (the grammar allows them).
    structured = StructuredOutputsParams(json=PET_SCHEMA, disable_any_whitespace=True)
    out = llm.chat(PET_CHAT, SamplingParams(n=20, temperature=1.0, max_tokens=160,
                                            structured_outputs=structured), use_tqdm=False)[0]
    assert len(out.outputs) == 20
    texts = [c.text for c in out.outputs]
    assert len(set(texts)) > 10  # really sampled
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PET_SCHEMA)


def test_sampled_regex_and_choice_outputs_fit(llm):
    regex = r"(0|[1-9][0-9]{0,3})-[a-z]{2,6}"
    choices = ["yes", "no", "it depends", "ça dépend"]
    prompts = [_chat_ids(llm, "Write a number, a dash and a word."),
               _chat_ids(llm, "Is it going to rain tomorrow?")]
    outs = llm.generate(prompts, [
        SamplingParams(n=8, temperature=1.0, max_tokens=16,
                       structured_outputs=StructuredOutputsParams(regex=regex)),
        SamplingParams(n=8, temperature=1.0, max_tokens=16,
                       structured_outputs=StructuredOutputsParams(choice=choices))],
        use_tqdm=False)
    for completion in outs[0].outputs:
        assert completion.finish_reason == "stop" and re.fullmatch(regex, completion.text), \
            completion.text
    assert {c.text for c in outs[1].outputs} <= set(choices)
    assert all(c.finish_reason == "stop" for c in outs[1].outputs)


def _satisfies(structured: StructuredOutputsParams, text: str) -> bool:
    if structured.regex is not None:
        return re.fullmatch(structured.regex, text) is not None
    if structured.choice is not None:
        return text in structured.choice
    try:
        jsonschema.validate(json.loads(text), structured.json)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


GREEDY_CASES = [
    ("What is the capital of France? Answer with one word.",
     StructuredOutputsParams(regex=r"The capital of France is [A-Z][a-z]+\.")),
    ("Is the sky blue? Answer yes or no.", StructuredOutputsParams(choice=["Yes.", "No."])),
    ('Return exactly this JSON and nothing else: {"name": "Ada", "age": 36}',
     StructuredOutputsParams(json={"type": "object", "properties": {
         "name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"]})),
    ("What is 2+2? Answer with a number only.",
     StructuredOutputsParams(regex=r"\d+ \+ \d+ = \d+")),
    # Does not fit (the model adds a code fence): the grammar changes the answer.
    ("Give me a JSON object with keys name and age for a person named Bob aged 30. Only JSON.",
     StructuredOutputsParams(json={"type": "object"})),
]


def test_greedy_output_is_the_unconstrained_one_where_that_fits(llm):
    prompts = [_chat_ids(llm, content) for content, _ in GREEDY_CASES]
    # A completion prompt cut by max_tokens: every prefix of a count fits the regex.
    prompts.append({"prompt_token_ids": llm.get_tokenizer().encode("Count: 1, 2, 3,")})
    cases = [s for _, s in GREEDY_CASES] + [StructuredOutputsParams(regex=r"( \d+,)+ ?")]
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    constrained = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=40,
                                                        structured_outputs=s) for s in cases],
                               use_tqdm=False)
    num_fitting = 0
    for structured, unconstrained, out in zip(cases, free, constrained, strict=True):
        free_out, out = unconstrained.outputs[0], out.outputs[0]
        if out.finish_reason == "stop":
            assert _satisfies(structured, out.text), out.text
        if _satisfies(structured, free_out.text) or (
                free_out.finish_reason == "length" and out.finish_reason == "length"
                and structured.regex is not None):
            num_fitting += 1
            assert out.token_ids == free_out.token_ids, (free_out.text, out.text)
        else:
            assert out.token_ids != free_out.token_ids
    assert num_fitting >= 4  # the comparison is not vacuous


def test_unconstrained_requests_in_a_mixed_batch_are_untouched(llm):
    tok = llm.get_tokenizer()
    free_prompts = [{"prompt_token_ids": tok.encode(p)} for p in
                    ("The quick brown fox", "Once upon a time", "In 1969, the first")]
    free_params = [SamplingParams(temperature=0, max_tokens=24),
                   SamplingParams(temperature=0.8, seed=7, max_tokens=24),
                   SamplingParams(temperature=1.0, seed=11, top_p=0.9, max_tokens=24)]
    alone = llm.generate(free_prompts, free_params, use_tqdm=False)
    constrained_params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=(
            StructuredOutputsParams(json=PET_SCHEMA, disable_any_whitespace=True))),
        SamplingParams(temperature=0, max_tokens=12,
                       structured_outputs=StructuredOutputsParams(regex=r"[a-z]+(, [a-z]+)*")),
        SamplingParams(temperature=0.7, seed=5, max_tokens=8,
                       structured_outputs=StructuredOutputsParams(choice=["left", "right"]))]
    mixed = llm.generate([_chat_ids(llm, PET_CHAT[0]["content"]),
                          free_prompts[0], _chat_ids(llm, "List some fruits."),
                          free_prompts[1], _chat_ids(llm, "Left or right?"), free_prompts[2]],
                         [constrained_params[0], free_params[0], constrained_params[1],
                          free_params[1], constrained_params[2], free_params[2]],
                         use_tqdm=False)
    for reference, out in zip(alone, mixed[1::2], strict=True):
        assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert mixed[4].outputs[0].text in ("left", "right")
    assert re.fullmatch(r"[a-z]+(, [a-z]+)*", mixed[2].outputs[0].text)
