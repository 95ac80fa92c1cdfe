"""The shared output path: CompletionState deltas, fan_out, and LLM's OutputProcessor.

Expected texts come from the tokenizer's own ``decode`` of the whole sequence and plain string
operations on it, never from the incremental code under test.
"""

from __future__ import annotations

import pytest

from gridllm.common.completion import CompletionState, decode_logprobs
from gridllm.common.contract import FinishReason, RequestUpdate, TokenLogprobs
from gridllm.common.output_processor import OutputProcessor, fan_out
from gridllm.common.sampling_params import SamplingParams
from tests.e2e.tiny_model import build_tokenizer

PROMPT = "Hello world, hello gridllm!"
TEXT = "The quick brown fox jumps over the lazy dog. café naïve déjà vu 日本語 🙂 done"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def chunked(token_ids: list[int], sizes: list[int]) -> list[list[int]]:
    """``token_ids`` cut into pieces of the given sizes, cycling; the last takes the rest."""
    out, start, k = [], 0, 0
    while start < len(token_ids):
        size = sizes[k % len(sizes)]
        out.append(token_ids[start:start + size])
        start += size
        k += 1
    return out


def script(req_id: str, token_ids: list[int], sizes: list[int] = (1,),
           finish: FinishReason = FinishReason.LENGTH, stop_reason: int | None = None,
           num_cached_tokens: int = 0) -> list[RequestUpdate]:
    """The updates a scheduler sends for ``token_ids``; the last one carries ``finish``."""
    updates = [RequestUpdate(req_id, piece, num_cached_tokens=num_cached_tokens)
               for piece in chunked(token_ids, list(sizes))]
    updates[-1].finish_reason, updates[-1].stop_reason = finish, stop_reason
    return updates


def run_state(tok, params: SamplingParams, updates: list[RequestUpdate]):
    state = CompletionState(tok, tok.encode(PROMPT), params)
    deltas = []
    for update in updates:
        deltas.append(state.process(update))
        if deltas[-1].finished:
            break
    return deltas


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [50]])
def test_deltas_concatenate_to_the_decoded_text(tok, sizes):
    ids = tok.encode(TEXT)
    deltas = run_state(tok, SamplingParams(), script("r", ids, sizes))
    assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=True)
    assert [t for d in deltas for t in d.new_token_ids] == ids
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == FinishReason.LENGTH and not deltas[-1].needs_abort


def test_multi_byte_characters_are_held_back_until_complete(tok):
    ids = tok.encode(TEXT)
    # The tiny vocabulary spells these characters as several byte tokens.
    partial = [k for k, t in enumerate(ids) if "\ufffd" in tok.decode([t])]
    assert partial, "the tokenizer no longer splits any character"
    deltas = run_state(tok, SamplingParams(), script("r", ids))
    assert all("\ufffd" not in d.text for d in deltas)
    assert any(deltas[k].text == "" for k in partial)


def test_a_character_cut_by_the_end_is_flushed(tok):
    ids = tok.encode("naïve 🙂")
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    deltas = run_state(tok, SamplingParams(), script("r", ids[:cut]))
    assert "".join(d.text for d in deltas) == tok.decode(ids[:cut])


def _stop_spanning_tokens(tok, ids: list[int]) -> str:
    """A stop string inside TEXT that no single token's text contains."""
    for start, end in ((4, 13), (10, 19), (16, 25)):
        stop = TEXT[start:end]
        if all(stop not in tok.decode([t]) for t in ids):
            return stop
    raise AssertionError("no stop string spans tokens")


@pytest.mark.parametrize("include_stop", [False, True])
@pytest.mark.parametrize("sizes", [[1], [3]])
def test_stop_string_spanning_tokens(tok, include_stop, sizes):
    ids = tok.encode(TEXT)
    stop = _stop_spanning_tokens(tok, ids)
    params = SamplingParams(stop=["never", stop], include_stop_str_in_output=include_stop)
    deltas = run_state(tok, params, script("r", ids, sizes))
    end = TEXT.index(stop) + (len(stop) if include_stop else 0)
    expected = tok.decode(ids)[:end]
    text = ""
    for delta in deltas[:-1]:
        text += delta.text
        # Held back: nothing streamed before the end goes past the stop string's start.
        assert expected.startswith(text) and len(text) <= TEXT.index(stop)
    assert text + deltas[-1].text == expected
    final = deltas[-1]
    assert (final.finish_reason, final.stop_reason) == (FinishReason.STOP, stop)
    # The engine still runs it: the caller must abort it.
    assert final.needs_abort and len(deltas) < len(chunked(ids, sizes))
    assert final.usage.completion_tokens == sum(len(d.new_token_ids) for d in deltas)


def test_stop_string_in_the_engines_last_update_wins_over_its_reason(tok):
    ids = tok.encode(TEXT)
    stop = _stop_spanning_tokens(tok, ids)
    last = len(tok.encode(TEXT[:TEXT.index(stop) + len(stop)])) + 2
    deltas = run_state(tok, SamplingParams(stop=[stop]),
                       script("r", ids[:last], [last], FinishReason.LENGTH))
    final = deltas[-1]
    assert (final.finish_reason, final.stop_reason) == (FinishReason.STOP, stop)
    assert not final.needs_abort  # the engine finished it already
    assert final.text == TEXT[:TEXT.index(stop)]


def test_stop_token_and_usage_come_from_the_engine(tok):
    ids = tok.encode("Hello world")
    deltas = run_state(tok, SamplingParams(), script("r", ids + [1], [2], FinishReason.STOP,
                                                     stop_reason=1, num_cached_tokens=16))
    final = deltas[-1]
    assert (final.finish_reason, final.stop_reason, final.needs_abort) == (
        FinishReason.STOP, 1, False)
    assert (final.usage.prompt_tokens, final.usage.completion_tokens,
            final.usage.cached_tokens) == (len(tok.encode(PROMPT)), len(ids) + 1, 16)
    assert "".join(d.text for d in deltas) == tok.decode(ids + [1], skip_special_tokens=True)


def test_fan_out_names_and_seeds_the_completions():
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=5)
    children = fan_out("req", params)
    assert [(c.req_id, c.index, c.params.seed, c.params.n) for c in children] == [
        ("req-0", 0, 7, 1), ("req-1", 1, 8, 1), ("req-2", 2, 9, 1)]
    assert all(c.params.clone(seed=7, n=3) == params for c in children)
    assert [(c.req_id, c.params.seed) for c in fan_out("req", SamplingParams(n=2))] == [
        ("req-0", None), ("req-1", None)]
    (single,) = fan_out("req", SamplingParams(seed=3))
    assert (single.req_id, single.index, single.params) == ("req", 0, SamplingParams(seed=3))


def test_output_processor_collects_n_completions_in_index_order(tok):
    texts = ["Hello world", "The quick brown fox", "日本語 🙂"]
    processor = OutputProcessor(tok)
    children = processor.add("7", PROMPT, tok.encode(PROMPT), SamplingParams(n=3, seed=1))
    scripts = {c.req_id: script(c.req_id, tok.encode(t), [2])
               for c, t in zip(children, texts, strict=True)}
    # Interleaved, the last completion's first: it (the shortest) finishes first.
    queues, updates = [list(scripts[c.req_id]) for c in reversed(children)], []
    while any(queues):
        updates += [queue.pop(0) for queue in queues if queue]
    finished = []
    for update in updates:
        done, stopped = processor.process([update])
        assert not stopped
        finished += done
    (output,) = finished
    assert (output.request_id, output.prompt, output.finished) == ("7", PROMPT, True)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert [c.text for c in output.outputs] == texts
    assert all(c.finish_reason == "length" for c in output.outputs)


def test_output_processor_reports_stop_strings_to_abort(tok):
    ids = tok.encode(TEXT)
    stop = _stop_spanning_tokens(tok, ids)
    processor = OutputProcessor(tok)
    (child,) = processor.add("0", None, [5], SamplingParams(stop=[stop]))
    stopped, finished = [], []
    for update in script(child.req_id, ids):
        done, ids_to_abort = processor.process([update])
        finished += done
        stopped += ids_to_abort
        if done:
            break
    assert stopped == ["0"]
    completion = finished[0].outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == (
        TEXT[:TEXT.index(stop)], "stop", stop)


def _logprobs(token_ids: list[int]) -> list[TokenLogprobs]:
    # The chosen token first, then a top-2 that repeats it (as the sampler sends).
    return [TokenLogprobs([t, t, 3], [-0.5, -0.5, -1.5], [1, 1, 2]) for t in token_ids]


def test_logprobs_are_decoded_and_keep_every_entry(tok):
    ids = tok.encode("café")
    (decoded,) = decode_logprobs(_logprobs(ids[:1]), tok)
    assert decoded.token_ids == [ids[0], ids[0], 3]
    assert decoded.tokens == [tok.decode([ids[0]]), tok.decode([ids[0]]), tok.decode([3])]
    position = decoded.to_position()
    assert list(position) == [ids[0], 3]
    assert (position[3].logprob, position[3].rank, position[3].decoded_token) == (
        -1.5, 2, tok.decode([3]))
    assert decode_logprobs(_logprobs(ids[:1]), None)[0].to_position()[3].decoded_token is None


def test_logprobs_follow_their_tokens_and_prompt_logprobs_the_first_completion(tok):
    ids = tok.encode("café 日本")
    prompt_ids = tok.encode(PROMPT)
    processor = OutputProcessor(tok)
    children = processor.add("0", PROMPT, prompt_ids,
                             SamplingParams(n=2, logprobs=2, prompt_logprobs=1))
    finished = []
    for child in children:
        updates = script(child.req_id, ids, [2])
        updates[0].new_prompt_logprobs = _logprobs(prompt_ids[1:])
        for update in updates:
            update.new_logprobs = _logprobs(update.new_token_ids)
        finished += processor.process(updates)[0]
    (output,) = finished
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt_ids)
    for position, token_id in zip(output.prompt_logprobs[1:], prompt_ids[1:], strict=True):
        assert list(position) == list(dict.fromkeys([token_id, 3]))
    for completion in output.outputs:
        assert [next(iter(p)) for p in completion.logprobs] == ids
        assert [p[t].decoded_token for p, t in zip(completion.logprobs, ids, strict=True)] == [
            tok.decode([t]) for t in ids]
    # Without logprobs asked for, none are decoded (the sampler would not send them).
    state = CompletionState(tok, prompt_ids, SamplingParams())
    assert state.process(RequestUpdate("r", ids[:1], _logprobs(ids[:1]))).new_logprobs == []
