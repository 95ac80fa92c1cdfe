"""router.validation: every bad field is refused with a message naming it."""

from __future__ import annotations

import pytest

from gridllm.common.contract import ModelLimits
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2
from router.validation import validate_request

LIMITS = ModelLimits(max_model_len=64, vocab_size=320, eos_token_id=1, block_size=16)

# (field, proto SamplingParams kwargs) that are out of range.
BAD_SAMPLING = [
    ("n", dict(n=0)),
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=1.5)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(max_tokens=4, min_tokens=5)),
    ("logprobs", dict(logprobs=-1)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("stop", dict(stop=[""])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=[320])),
    ("allowed_token_ids", dict(allowed_token_ids=[-3])),
    ("allowed_token_ids", dict(allowed_token_ids=[5, 999])),
    ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={400: 1.0})),
    ("logprobs", dict(logprobs=321)),
]


def _request(**kwargs) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(**kwargs)


@pytest.mark.parametrize("field,kwargs", BAD_SAMPLING,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_SAMPLING)])
def test_sampling_param_out_of_range_names_field(tiny_tokenizer, field, kwargs):
    request = _request(prompt="hello", sampling_params=generate_pb2.SamplingParams(**kwargs))
    with pytest.raises(ValueError, match=rf"^sampling_params\.{field}\b"):
        validate_request(request, tiny_tokenizer, LIMITS)


def test_in_range_params_map_to_python_fields(tiny_tokenizer):
    pb = generate_pb2.SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_tokens=7,
                                     stop=["x"], seed=3, logprobs=2, ignore_eos=True)
    validated = validate_request(_request(prompt="hello", sampling_params=pb), tiny_tokenizer,
                                 LIMITS)
    expected = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_tokens=7, stop=["x"],
                              seed=3, logprobs=2, ignore_eos=True)
    assert validated.sampling_params == expected


def test_absent_sampling_params_are_defaults(tiny_tokenizer):
    validated = validate_request(_request(prompt="hi"), tiny_tokenizer, LIMITS)
    assert validated.sampling_params == SamplingParams()


def test_text_prompt_is_tokenized_by_the_tokenizer(tiny_tokenizer):
    text = "Hello world, café 🙂"
    validated = validate_request(_request(prompt=text, request_id="r1"), tiny_tokenizer, LIMITS)
    assert validated.prompt_token_ids == tiny_tokenizer.encode(text)
    assert validated.prompt == text
    assert validated.request_id == "r1"


@pytest.mark.parametrize("request_id", ["¡hola", "tab\there", "x" * 300])
def test_request_ids_the_metadata_cannot_carry_are_refused(tiny_tokenizer, request_id):
    """Ids travel upstream in gRPC metadata (printable ASCII only)."""
    with pytest.raises(ValueError, match="request_id must be at most"):
        validate_request(_request(prompt="hi", request_id=request_id), tiny_tokenizer, LIMITS)


def test_request_ids_are_generated_unique(tiny_tokenizer):
    ids = {validate_request(_request(prompt="hi"), tiny_tokenizer, LIMITS).request_id
           for _ in range(5)}
    assert len(ids) == 5 and all(ids)


@pytest.mark.parametrize("request_kwargs", [
    dict(prompt=""),
    dict(prompt_token_ids=generate_pb2.TokenIds(ids=[])),
    dict(chat=generate_pb2.ChatMessages(messages=[])),
    dict(),
], ids=["empty-text", "empty-ids", "empty-chat", "no-input"])
def test_empty_prompt_is_invalid(tiny_tokenizer, request_kwargs):
    with pytest.raises(ValueError, match=r"prompt|chat"):
        validate_request(_request(**request_kwargs), tiny_tokenizer, LIMITS)


def test_prompt_over_max_model_len_is_invalid(tiny_tokenizer):
    long_ids = generate_pb2.TokenIds(ids=[5] * LIMITS.max_model_len)
    with pytest.raises(ValueError, match=r"^prompt_token_ids has 64 tokens; max_model_len"):
        validate_request(_request(prompt_token_ids=long_ids), tiny_tokenizer, LIMITS)
    text = "the quick brown fox " * 40
    assert len(tiny_tokenizer.encode(text)) >= LIMITS.max_model_len
    with pytest.raises(ValueError, match=r"^prompt has \d+ tokens; max_model_len"):
        validate_request(_request(prompt=text), tiny_tokenizer, LIMITS)
    # One token shorter than max_model_len leaves room for one generated token.
    ok = generate_pb2.TokenIds(ids=[5] * (LIMITS.max_model_len - 1))
    assert len(validate_request(_request(prompt_token_ids=ok), tiny_tokenizer,
                                LIMITS).prompt_token_ids) == 63


def test_token_ids_outside_vocab_are_invalid(tiny_tokenizer):
    ids = generate_pb2.TokenIds(ids=[3, LIMITS.vocab_size])
    with pytest.raises(ValueError, match=r"^prompt_token_ids must be token ids in \[0, 320\)"):
        validate_request(_request(prompt_token_ids=ids), tiny_tokenizer, LIMITS)


def test_chat_uses_the_chat_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = generate_pb2.ChatMessages(
        messages=[generate_pb2.ChatMessage(**m) for m in messages])
    validated = validate_request(_request(chat=chat), tiny_tokenizer, LIMITS)
    expected = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert validated.prompt_token_ids == list(expected)
    assert validated.prompt is None


def test_chat_message_with_unknown_field_is_invalid(tiny_tokenizer):
    # A client built from a newer proto sends field 3 ("name") in a message: it arrives as
    # an unknown field, and must not be silently dropped.
    message = generate_pb2.ChatMessage(role="user", content="hi").SerializeToString()
    message += bytes([(3 << 3) | 2, 3]) + b"bob"
    chat = generate_pb2.ChatMessages.FromString(bytes([(1 << 3) | 2, len(message)]) + message)
    with pytest.raises(ValueError,
                       match=r"^chat\.messages\[0\] has unknown fields \(numbers \[3\]\)"):
        validate_request(_request(chat=chat), tiny_tokenizer, LIMITS)


def test_chat_message_with_empty_role_is_invalid(tiny_tokenizer):
    chat = generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="", content="x")])
    with pytest.raises(ValueError, match=r"^chat\.messages\[0\]\.role"):
        validate_request(_request(chat=chat), tiny_tokenizer, LIMITS)


def test_text_prompt_without_tokenizer_is_invalid():
    with pytest.raises(ValueError, match=r"^prompt: .*no tokenizer"):
        validate_request(_request(prompt="hi"), None, LIMITS)
    ids = generate_pb2.TokenIds(ids=[4, 5])
    assert validate_request(_request(prompt_token_ids=ids), None,
                            LIMITS).prompt_token_ids == [4, 5]
