"""router.validation against hostile sizes: each is refused naming the field, before the work
that grows with it (a prompt too long to fit is never tokenized)."""

from __future__ import annotations

import time

import pytest

from gridllm.common.config import RequestLimits
from gridllm.common.contract import ModelLimits
from gridllm.v1 import generate_pb2
from router.validation import max_token_chars, validate_request

LIMITS = ModelLimits(max_model_len=64, vocab_size=320, eos_token_id=1, block_size=16)
SMALL = RequestLimits(max_n=4, max_logprobs=3, max_num_stop_strings=2, max_stop_string_len=5,
                      max_num_stop_token_ids=3, max_num_logit_bias=2)
SP = generate_pb2.SamplingParams

BAD = [
    ("n", "max_n", SP(n=5)),
    ("n", "max_n", SP(n=2147483647)),
    ("logprobs", "max_logprobs", SP(logprobs=4)),
    ("prompt_logprobs", "max_logprobs", SP(prompt_logprobs=4)),
    ("stop", "max_num_stop_strings", SP(stop=["a", "b", "c"])),
    ("stop", "max_stop_string_len", SP(stop=["abcdef"])),
    ("stop_token_ids", "max_num_stop_token_ids", SP(stop_token_ids=[2, 3, 4, 5])),
    ("logit_bias", "max_num_logit_bias", SP(logit_bias={2: 1.0, 3: 1.0, 4: 1.0})),
]


@pytest.mark.parametrize("field,limit_name,params", BAD, ids=[f"{b[1]}-{i}"
                                                               for i, b in enumerate(BAD)])
def test_requests_past_a_limit_name_the_field_and_the_limit(tiny_tokenizer, field, limit_name,
                                                            params):
    request = generate_pb2.GenerateRequest(prompt="hello", sampling_params=params)
    with pytest.raises(ValueError, match=rf"^sampling_params\.{field}\b.*\({limit_name}\)"):
        validate_request(request, tiny_tokenizer, LIMITS, SMALL)


def test_the_default_limits_apply_when_none_are_given(tiny_tokenizer):
    request = generate_pb2.GenerateRequest(prompt="hello", sampling_params=SP(n=100000))
    with pytest.raises(ValueError, match=r"^sampling_params\.n must be at most 128"):
        validate_request(request, tiny_tokenizer, LIMITS)


def test_prompt_logprobs_past_the_limit_on_a_short_prompt(tiny_tokenizer):
    # Once enough to lose a worker: 49152 log-probabilities per prompt position.
    request = generate_pb2.GenerateRequest(prompt="hello", sampling_params=SP(
        prompt_logprobs=49152))
    with pytest.raises(ValueError, match=r"^sampling_params\.prompt_logprobs must be at most "
                                         r"20 log-probabilities per position \(max_logprobs\)"):
        validate_request(request, tiny_tokenizer, LIMITS)


def test_max_tokens_past_the_context_is_refused_and_an_unset_one_fits(tiny_tokenizer):
    ids = generate_pb2.TokenIds(ids=[5] * 60)
    with pytest.raises(ValueError, match=r"^sampling_params\.max_tokens must be at most 4 for "
                                         r"this prompt"):
        validate_request(generate_pb2.GenerateRequest(prompt_token_ids=ids,
                                                      sampling_params=SP(max_tokens=5)),
                         tiny_tokenizer, LIMITS)
    fitted = validate_request(generate_pb2.GenerateRequest(prompt_token_ids=ids),
                              tiny_tokenizer, LIMITS)
    assert fitted.sampling_params.max_tokens == 4
    exact = validate_request(generate_pb2.GenerateRequest(
        prompt_token_ids=ids, sampling_params=SP(max_tokens=4)), tiny_tokenizer, LIMITS)
    assert exact.sampling_params.max_tokens == 4


def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing(tiny_tokenizer):
    bound = LIMITS.max_model_len * max_token_chars(tiny_tokenizer)
    text = "a" * (50 << 20)  # 50 MB: tokenizing it would take tens of seconds
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^prompt has {len(text)} characters: more than "
                                         rf"any prompt of max_model_len=64 tokens can have "
                                         rf"\({bound}\)"):
        validate_request(generate_pb2.GenerateRequest(prompt=text), tiny_tokenizer, LIMITS)
    assert time.perf_counter() - start < 1.0
    # At the bound the text is tokenized (and then refused for its token count).
    with pytest.raises(ValueError, match=r"^prompt has \d+ tokens; max_model_len is 64"):
        validate_request(generate_pb2.GenerateRequest(prompt="a " * (bound // 2)),
                         tiny_tokenizer, LIMITS)


def test_the_character_bound_never_refuses_a_prompt_that_fits(tiny_tokenizer):
    # The longest vocabulary entries, repeated up to the context: the most characters a
    # prompt of max_model_len - 1 tokens can have.
    vocab = tiny_tokenizer.get_vocab()
    longest = max(vocab, key=len)
    text = tiny_tokenizer.decode([vocab[longest]]) * (LIMITS.max_model_len - 1)
    ids = tiny_tokenizer.encode(text)
    assert len(ids) < LIMITS.max_model_len
    validated = validate_request(generate_pb2.GenerateRequest(
        prompt=text, sampling_params=SP(max_tokens=1)), tiny_tokenizer, LIMITS)
    assert validated.prompt_token_ids == ids


def test_a_chat_too_large_to_fit_is_refused_before_rendering(tiny_tokenizer):
    many = generate_pb2.ChatMessages(messages=[
        generate_pb2.ChatMessage(role="user", content="") for _ in range(64)])
    with pytest.raises(ValueError, match=r"^chat\.messages has 64 messages; max_model_len is"):
        validate_request(generate_pb2.GenerateRequest(chat=many), tiny_tokenizer, LIMITS)
    huge = generate_pb2.ChatMessages(messages=[
        generate_pb2.ChatMessage(role="user", content="a" * (10 << 20))])
    with pytest.raises(ValueError, match=r"^chat\.messages has \d+ characters"):
        validate_request(generate_pb2.GenerateRequest(chat=huge), tiny_tokenizer, LIMITS)


def test_a_token_id_prompt_far_past_the_context_is_refused_by_its_length(tiny_tokenizer):
    ids = generate_pb2.TokenIds(ids=[10**6] * 100_000)  # out of vocabulary too: length first
    with pytest.raises(ValueError, match=r"^prompt_token_ids has 100000 tokens"):
        validate_request(generate_pb2.GenerateRequest(prompt_token_ids=ids), tiny_tokenizer,
                         LIMITS)
