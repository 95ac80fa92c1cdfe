"""Hypothesis strategies for hostile GenerateRequests: every field, from plausible values to
the edges of its type (NaN, huge counts, lists past every limit, bad ids, long texts)."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2
from hypothesis import strategies as st

from gridllm.v1 import generate_pb2

# The tiny model's vocabulary and context (tests.e2e.tiny_model).
VOCAB_SIZE = 320
MAX_MODEL_LEN = 4096

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)


def mostly(usual, hostile):
    """``usual`` three times in four (a request often gets past the first checks and runs),
    else ``hostile``."""
    return st.one_of(usual, usual, usual, hostile)


SMALL_INT = mostly(st.integers(-2, 6), INT32)
ANY_FLOAT = mostly(st.floats(-3.0, 3.0), st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -0.0, 1e-6, math.nan, math.inf])))
TOKEN_ID = st.one_of(st.integers(0, VOCAB_SIZE - 1), st.integers(VOCAB_SIZE, 400), INT64)
TEXT = st.text(max_size=24)
PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
# Sizes around every limit: empty, a few, the defaults' bounds and past them.
LIST_SIZES = st.sampled_from([0, 1, 3, 20, 21, 64, 65, 320, 321, 1024, 1025, 5000])


def sized_list(item, max_small: int = 6):
    """A short list drawn item by item, or a long one repeating one item (cheap to draw)."""
    repeated = st.tuples(item, LIST_SIZES).map(lambda pair: [pair[0]] * pair[1])
    return st.one_of(st.lists(item, max_size=max_small), repeated)


STOP_STRINGS = sized_list(st.text(max_size=600))
TOKEN_ID_LISTS = sized_list(TOKEN_ID)
LOGIT_BIAS = st.one_of(st.dictionaries(TOKEN_ID, ANY_FLOAT, max_size=4),
                       LIST_SIZES.map(lambda size: dict.fromkeys(range(size), 1.0)))


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
_EXTRA_ARGS = st.one_of(
    st.dictionaries(st.text(max_size=24), _JSON, max_size=3),
    st.fixed_dictionaries({}, optional={"no_repeat_ngram_size": st.one_of(SMALL_INT, _JSON),
                                        "epsilon_cutoff": st.one_of(ANY_FLOAT, _JSON)}))
_PROCESSOR = st.sampled_from(["no_repeat_ngram", "epsilon_cutoff", "no-such-processor", ""])


@st.composite
def sampling_params(draw) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams()

    def maybe(name, strategy):
        # One field in four is set: a request often gets past the first checks.
        if draw(st.integers(0, 3)) == 0:
            setattr(msg, name, draw(strategy))

    maybe("n", mostly(st.integers(1, 3), st.one_of(st.sampled_from([0, -1, 128, 129, 100000]),
                                                    INT32)))
    maybe("temperature", ANY_FLOAT)
    maybe("top_p", ANY_FLOAT)
    maybe("top_k", SMALL_INT)
    maybe("min_p", ANY_FLOAT)
    maybe("presence_penalty", ANY_FLOAT)
    maybe("frequency_penalty", ANY_FLOAT)
    maybe("repetition_penalty", ANY_FLOAT)
    maybe("seed", INT64)
    msg.stop.extend(draw(st.one_of(st.just([]), st.just([]), STOP_STRINGS)))
    msg.stop_token_ids.extend(draw(st.one_of(st.just([]), st.just([]), TOKEN_ID_LISTS)))
    maybe("ignore_eos", st.booleans())
    # Mostly short completions: a fuzz case reads a few messages and then cancels.
    maybe("max_tokens", mostly(st.integers(1, 8), st.one_of(
        INT32, st.sampled_from([MAX_MODEL_LEN, MAX_MODEL_LEN - 1]))))
    maybe("unbounded_max_tokens", st.booleans())
    maybe("min_tokens", SMALL_INT)
    maybe("logprobs", mostly(st.integers(0, 20), st.one_of(
        st.sampled_from([-1, 21, 320, 321, 49152]), INT32)))
    maybe("prompt_logprobs", mostly(st.integers(0, 20), st.one_of(
        st.sampled_from([-1, 21, 49152]), INT32)))
    maybe("skip_special_tokens", st.booleans())
    maybe("include_stop_str_in_output", st.booleans())
    msg.logit_bias.update(draw(st.one_of(st.just({}), st.just({}), LOGIT_BIAS)))
    msg.allowed_token_ids.extend(draw(st.one_of(st.just([]), st.just([]), TOKEN_ID_LISTS)))
    msg.logits_processors.extend(draw(st.one_of(st.just([]), st.lists(_PROCESSOR, max_size=3))))
    if draw(st.integers(0, 3)) == 0:
        extra = struct_pb2.Struct()
        extra.update(draw(_EXTRA_ARGS))
        msg.extra_args.CopyFrom(extra)
    return msg


@st.composite
def prompt_text(draw) -> str:
    if draw(st.integers(0, 9)):
        return draw(st.text(max_size=200))
    # Long texts: near the character bound of the context, or far past it.
    return draw(st.sampled_from(["a", "日本語 ", "\u0301", "<|im_start|>"])) * draw(
        st.sampled_from([4000, 50_000, 400_000]))


@st.composite
def generate_requests(draw) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest()
    if draw(st.integers(0, 3)) == 0:
        request.request_id = draw(mostly(st.text(PRINTABLE, max_size=24), st.one_of(
            TEXT, st.text(PRINTABLE, min_size=250, max_size=300))))
    kind = draw(st.sampled_from(["prompt", "prompt", "prompt_token_ids", "chat", "none"]))
    if kind == "prompt":
        request.prompt = draw(prompt_text())
    elif kind == "prompt_token_ids":
        ids = draw(st.one_of(
            st.lists(st.one_of(st.integers(0, VOCAB_SIZE - 1), UINT32), max_size=40),
            st.sampled_from([MAX_MODEL_LEN - 9, MAX_MODEL_LEN, 100_000]).map(lambda n: [7] * n)))
        request.prompt_token_ids.ids.extend(ids)
    elif kind == "chat":
        request.chat.CopyFrom(generate_pb2.ChatMessages(messages=[
            generate_pb2.ChatMessage(role=role, content=content)
            for role, content in draw(st.lists(st.tuples(
                st.sampled_from(["user", "assistant", "user", "system", "", "x" * 40]),
                st.text(max_size=80)), max_size=4))]))
        if draw(st.booleans()):
            request.chat.add_generation_prompt = draw(st.booleans())
    if draw(st.booleans()):
        request.sampling_params.CopyFrom(draw(sampling_params()))
    request.priority = draw(st.one_of(st.just(0), INT32))
    request.return_token_ids = draw(st.booleans())
    if draw(st.booleans()):
        request.add_special_tokens = draw(st.booleans())
    return request
