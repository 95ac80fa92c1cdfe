"""IncrementalDetokenizer: the tokenizers library's streaming decoder gives the same deltas, at
the same tokens, as decoding windows with ``tokenizer.decode``, and the text of the whole
sequence; tokenizers it cannot follow keep the window path."""

from __future__ import annotations

import copy
import os
import random

import pytest

from gridllm.common.detokenizer import IncrementalDetokenizer
from gridllm.common.presets import cache_dir
from gridllm.common.sampling_params import SamplingParams
from tests.e2e.tiny_model import build_tokenizer

TEXT = "The quick brown fox — café naïve déjà vu 日本語 🙂! Hello world, hello gridllm."


def _smollm2_tokenizer():
    path = os.path.join(cache_dir(), "smollm2-135m")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tok(request, tiny_tokenizer):
    if request.param == "tiny":
        return tiny_tokenizer
    tokenizer = _smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("the smollm2-135m preset is not in the cache")
    return tokenizer


def _deltas(tok, prompt_ids, ids, skip_special_tokens, use_stream):
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(
        skip_special_tokens=skip_special_tokens))
    if use_stream:
        assert det._stream is not None
    else:
        det._stream = None
    deltas = []
    for token_id in ids:
        det.update([token_id])
        deltas.append(det.get_delta(False))
    deltas.append(det.get_delta(True))
    return deltas


def _sequences(tok, count: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = len(tok)
    text_ids = tok.encode(TEXT, add_special_tokens=False)
    for _ in range(count):
        # Runs of real text (multi-byte characters over several tokens) mixed with random ids
        # (special tokens, lone bytes that never complete a character).
        ids = []
        while len(ids) < 40:
            if rng.random() < 0.5:
                start = rng.randrange(len(text_ids))
                ids += text_ids[start:start + rng.randrange(1, 12)]
            else:
                ids.append(rng.randrange(vocab))
        yield ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_decoder_gives_the_window_decoders_deltas(tok, skip_special_tokens):
    prompt_ids = tok.encode("Once upon a time")
    num_streamed = 0
    for ids in _sequences(tok, 60):
        streamed = _deltas(tok, prompt_ids, ids, skip_special_tokens, use_stream=True)
        windows = _deltas(tok, prompt_ids, ids, skip_special_tokens, use_stream=False)
        assert streamed == windows, ids
        num_streamed += 1
        # A completion that ends on whole characters is exactly the decoded sequence.
        whole = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in whole:
            full = tok.decode(prompt_ids[-5:] + ids, skip_special_tokens=skip_special_tokens)
            context = tok.decode(prompt_ids[-5:], skip_special_tokens=skip_special_tokens)
            assert "".join(streamed) == full[len(context):]
    assert num_streamed == 60


def test_fast_tokenizers_stream_and_cleaning_ones_decode_windows(tiny_tokenizer):
    params = SamplingParams()
    assert IncrementalDetokenizer(tiny_tokenizer, [5], params)._stream is not None
    cleaning = copy.deepcopy(tiny_tokenizer)
    cleaning.clean_up_tokenization_spaces = True  # a post-processing DecodeStream skips
    assert IncrementalDetokenizer(cleaning, [5], params)._stream is None
    assert IncrementalDetokenizer(None, [5], params)._stream is None
