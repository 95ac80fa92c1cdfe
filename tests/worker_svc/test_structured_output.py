"""Structured outputs on the worker (a tiny random Llama with a real byte-level tokenizer):
masks against a brute-force oracle, compiles off the caller's thread and once per spec, and
grammars that survive pipelined steps, preemption and resubmission."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from gridllm.common.contract import NewRequestData, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams
from gridllm.common.tokenizer import load_tokenizer
from tests.e2e.tiny_model import build_tiny_served_model
from tests.worker_svc.step_driver import run_requests
from worker_svc import structured_output
from worker_svc.sampler import Sampler
from worker_svc.sampling_metadata import SamplingMetadata
from worker_svc.structured_output import GrammarCompiler, RequestGrammar, StructuredOutputManager

pytest.importorskip("xgrammar")

VOCAB = 320
EOS = 1  # <|im_end|>, the tiny tokenizer's EOS
CHOICES = ["hello world", "hello gridllm", "quick fox"]
REGEX = r"[a-z]{2,5}-\d{1,3}"
SCHEMA = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["city", "ok", "tags"], "additionalProperties": False}
SPECS = [StructuredOutputsParams(choice=CHOICES), StructuredOutputsParams(regex=REGEX),
         StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_served_model(tmp_path_factory.mktemp("tiny-structured"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler(lambda: tokenizer, VOCAB)
    yield compiler
    compiler.close()


@pytest.fixture(scope="module")
def llm(model_dir):
    from gridllm.llm import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=128, max_model_len=512)


def _allowed(grammar: RequestGrammar) -> set[int]:
    from kernels.torch_ref import unpack_token_bitmask

    bitmask = structured_output.BitmaskFiller(VOCAB).fill([grammar])
    allowed = unpack_token_bitmask(torch.from_numpy(bitmask.copy()), VOCAB)[0]
    return set(allowed.nonzero().flatten().tolist())


def _fits(spec: StructuredOutputsParams, text: str) -> bool:
    if spec.choice is not None:
        return text in spec.choice
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    value = json.loads(text)
    return (set(value) == {"city", "ok", "tags"} and value["city"] in ("Paris", "Rome")
            and isinstance(value["ok"], bool) and set(value["tags"]) <= {"a", "b"})


# ---------------------------------------------------------------------------- masks
def test_masks_match_a_brute_force_oracle(compiler, tokenizer):
    """At every prefix of every choice, a token is allowed iff the text stays a prefix of
    a choice; EOS iff the text is a whole choice."""
    special = set(tokenizer.all_special_ids)
    grammar = RequestGrammar(compiler.compile(StructuredOutputsParams(choice=CHOICES)), [EOS])
    assert grammar.error() is None
    for choice in CHOICES:
        grammar = RequestGrammar(compiler.compile(StructuredOutputsParams(choice=CHOICES)),
                                 [EOS])
        assert grammar.error() is None
        prefix: list[int] = []
        for token_id in tokenizer.encode(choice, add_special_tokens=False) + [EOS]:
            text = tokenizer.decode(prefix)
            expected = {t for t in range(VOCAB) if t not in special and any(
                c.startswith(tokenizer.decode(prefix + [t])) for c in CHOICES)}
            if text in CHOICES:
                expected.add(EOS)
            assert _allowed(grammar) == expected, f"after {text!r}"
            assert grammar.accept(token_id) is None
            prefix.append(token_id)
        assert grammar.is_terminated


def test_replay_builds_the_state_incremental_accepts_build(compiler, tokenizer):
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    tokens = tokenizer.encode('{"city": "Rome", "ok": tr', add_special_tokens=False)
    stepped = RequestGrammar(compiler.compile(spec), [EOS])
    assert stepped.error() is None
    for token_id in tokens:
        assert stepped.accept(token_id) is None
    replayed = RequestGrammar(compiler.compile(spec), [EOS], tokens)
    assert replayed.error() is None and replayed.num_accepted == len(tokens)
    assert _allowed(replayed) == _allowed(stepped) == set(
        t for t in range(VOCAB) if "true".startswith("tr" + tokenizer.decode([t]))
        and tokenizer.decode([t]))
    bad = RequestGrammar(compiler.compile(spec), [EOS], tokenizer.encode(
        '{"town"', add_special_tokens=False))
    assert "replaying generated token" in bad.error()


def test_a_terminated_matcher_allows_only_its_stop_tokens(compiler, tokenizer):
    grammar = RequestGrammar(compiler.compile(StructuredOutputsParams(choice=["quick"])),
                             [EOS, 5])
    assert grammar.error() is None
    for token_id in tokenizer.encode("quick", add_special_tokens=False) + [EOS]:
        assert grammar.accept(token_id) is None
    # ignore_eos kept the request going: only stop tokens can follow.
    assert _allowed(grammar) == {EOS, 5}
    assert grammar.accept(EOS) is None


# ---------------------------------------------------------------------------- compiles
def test_compiles_once_per_spec_off_the_callers_thread(tokenizer, monkeypatch):
    release = threading.Event()
    threads: list[str] = []
    compile_spec = structured_output._compile_spec

    def slow_compile(compiler, params):
        threads.append(threading.current_thread().name)
        assert release.wait(30)
        return compile_spec(compiler, params)

    monkeypatch.setattr(structured_output, "_compile_spec", slow_compile)
    compiler = GrammarCompiler(lambda: tokenizer, VOCAB)
    try:
        spec = StructuredOutputsParams(regex=REGEX)
        first = compiler.compile(spec)
        assert not first.done()  # the caller did not wait
        assert compiler.compile(StructuredOutputsParams(regex=REGEX)) is first
        release.set()
        first.result(timeout=30)
        assert compiler.compile(spec) is first and compiler.num_compiles == 1
        assert threads and all(t.startswith("grammar") for t in threads)
    finally:
        release.set()
        compiler.close()


@pytest.mark.parametrize("spec,message", [
    (StructuredOutputsParams(regex="(ab"), r"^structured_outputs\.regex does not compile: "
                                           r"Regex parsing error"),
    (StructuredOutputsParams(grammar='root ::= item'),
     r"^structured_outputs\.grammar does not compile: EBNF parser error"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
     r"^structured_outputs\.json does not compile: Unsupported type"),
])
def test_bad_specs_fail_naming_the_field(compiler, spec, message):
    with pytest.raises(ValueError, match=message):
        compiler.compile(spec).result(timeout=30)


def test_a_worker_without_a_tokenizer_refuses_structured_outputs():
    compiler = GrammarCompiler(None, VOCAB)
    with pytest.raises(ValueError, match="^structured_outputs need the model's tokenizer"):
        compiler.compile(StructuredOutputsParams(json_object=True)).result()


def test_cache_evicts_least_recently_used_beyond_its_budget(tokenizer):
    compiler = GrammarCompiler(lambda: tokenizer, VOCAB, max_cache_entries=2)
    try:
        futures = [compiler.compile(StructuredOutputsParams(regex=f"a{{{n}}}"))
                   for n in range(1, 4)]
        for future in futures:
            future.result(timeout=30)
        assert compiler.compile(StructuredOutputsParams(regex="a{3}")) is futures[2]
        assert compiler.compile(StructuredOutputsParams(regex="a{1}")) is not futures[0]
    finally:
        compiler.close()


# ---------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("use_kernel", [False, True])
def test_sampler_applies_the_bitmask_to_its_rows_only(use_kernel):
    logits = torch.randn(3, 70)
    allowed = torch.zeros(70, dtype=torch.bool)
    allowed[[3, 40, 69]] = True
    words = torch.zeros(3, dtype=torch.int64)
    for t in allowed.nonzero().flatten().tolist():
        words[t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)[None]
    meta = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 3, [[1]] * 3, [[]] * 3,
                                  [1, 2, 3], [None] * 3, 70, torch.device("cpu"))
    meta.token_bitmask, meta.bitmask_rows = bitmask, torch.tensor([1])
    tokens = Sampler(use_kernel=use_kernel)(logits, meta).token_ids
    masked = logits[1].masked_fill(~allowed, float("-inf"))
    assert tokens.tolist() == [int(logits[0].argmax()), int(masked.argmax()),
                               int(logits[2].argmax())]


# ---------------------------------------------------------------------------- engine
def _params(seed: int, max_tokens: int = 48) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed + k, max_tokens=max_tokens,
                           structured_outputs=s)
            for k, s in enumerate(SPECS)]


def test_outputs_fit_with_and_without_pipelined_steps(llm):
    """Two steps in flight: a constrained row reads the previous step's ids before its
    mask is filled; the outputs equal those of one step at a time."""
    prompts = ["Hello world", "The quick brown fox", "café"]
    params = _params(1) + _params(7)
    outputs = {}
    for max_steps_in_flight in (1, 2):
        llm.engine.max_steps_in_flight = max_steps_in_flight
        outs = llm.generate(prompts * 2, params, use_tqdm=False)
        outputs[max_steps_in_flight] = [o.outputs[0].token_ids for o in outs]
        for spec, out in zip(SPECS * 2, outs, strict=True):
            assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
            assert _fits(spec, out.outputs[0].text), out.outputs[0].text
    llm.engine.max_steps_in_flight = 1
    assert outputs[1] == outputs[2]


def test_preempted_requests_resume_their_grammar(llm, model_dir):
    from gridllm.llm import LLM

    words = ["Hello", "world", "quick", "brown", "fox", "café", "naïve", "tiny", "model"]
    prompts = [" ".join(words[(k + i) % len(words)] for i in range(16)) for k in range(6)]
    params = _params(3) + _params(11)
    reference = llm.generate(prompts, params, use_tqdm=False)
    # 8 blocks of 16 tokens for six requests of 30-70 tokens: recompute preemptions.
    small = LLM(model_dir, device="cpu", num_kv_blocks=8, max_model_len=512,
                enable_prefix_caching=False)
    preempted = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    for ref, out in zip(reference, preempted, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_resubmitted_request_replays_its_tokens_into_a_fresh_matcher(llm, tokenizer):
    """A request rebuilt with its generated tokens (moved to another worker) continues the
    grammar where it was; without the replay its first mask would start the grammar over."""
    runner = llm.engine.runner
    prompt = tokenizer.encode("Hello world")
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=spec)
    # The driver stops at a length only: past EOS the finished grammar allows only EOS.
    (whole,), _ = run_requests(runner, [prompt], params, 56)
    assert _fits(spec, tokenizer.decode(whole[:whole.index(EOS)]))
    assert set(whole[whole.index(EOS):]) == {EOS}
    for cut in (1, 9, 30):
        runner.execute_model(SchedulerOutput(finished_req_ids={"req-0"}))  # the driver's id
        (rest,), _ = run_requests(runner, [prompt], params, 56, resumed_outputs=[whole[:cut]])
        assert whole[:cut] + rest == whole
    runner.execute_model(SchedulerOutput(finished_req_ids={"req-0"}))


def test_a_spec_that_does_not_compile(llm, tokenizer):
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(x"))
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex does not compile"):
        llm.generate(["Hello", "world"], [SamplingParams(max_tokens=4), bad], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing was queued
    # On a worker (no front checked it): that request is refused, its step neighbour runs.
    runner = llm.engine.runner
    prompt = tokenizer.encode("Hello world")
    bad = bad.clone(structured_outputs=StructuredOutputsParams(regex="(never compiled"))
    out = runner.execute_model(SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("bad", prompt, bad, [], [0], 0),
                            NewRequestData("good", prompt, SamplingParams(), [], [1], 0)],
        num_scheduled_tokens={"bad": len(prompt), "good": len(prompt)},
        total_num_scheduled_tokens=2 * len(prompt)))
    assert "does not compile" in out.failed["bad"]
    assert "good" in out.sampled_token_ids and "good" not in out.failed
    assert "bad" not in runner.requests and "bad" not in runner.input_batch.rows
    runner.execute_model(SchedulerOutput(finished_req_ids={"bad", "good"}))
    assert not {"bad", "good"} & set(runner.requests)


def test_a_token_the_grammar_refuses_fails_only_its_request(llm):
    """min_tokens past the grammar's end leaves no allowed token: the request fails with a
    reason instead of emitting text outside the grammar."""
    forced = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4,
                            structured_outputs=StructuredOutputsParams(choice=["quick"]))
    outs = llm.generate(["Hello", "Hello"], [forced, SamplingParams(temperature=0.0,
                                                                   max_tokens=8)],
                        use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].text == "quick"
    assert outs[1].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("max_steps_in_flight", [1, 2])
def test_masks_off_the_loop_give_the_outputs_of_masks_on_the_loop(llm, max_steps_in_flight):
    """Sampled and greedy constrained rows next to unconstrained ones: the outputs with
    the tokens accepted and the masks filled on the grammar thread equal those with both
    done on the step loop, and the thread's prefilled masks were the ones used."""
    prompts = ["Hello world", "The quick brown fox", "café", "tiny model"] * 2
    greedy = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=SPECS[2])
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=24)
    params = _params(5) + [greedy, free, greedy, free, _params(8)[0]]
    specs = SPECS + [SPECS[2], None, SPECS[2], None, SPECS[0]]
    manager = llm.engine.runner.structured_outputs
    llm.engine.max_steps_in_flight = max_steps_in_flight
    outputs = {}
    try:
        for is_overlapped in (False, True):
            manager.set_overlapped(is_overlapped)
            outs = llm.generate(prompts, params, use_tqdm=False)
            outputs[is_overlapped] = [o.outputs[0].token_ids for o in outs]
            timings = manager.timings
            if is_overlapped:
                assert timings.num_prefilled_rows > timings.num_loop_filled_rows
            else:
                assert timings.num_prefilled_rows == 0 and timings.accept_off_loop == 0
    finally:
        manager.set_overlapped(True)
        llm.engine.max_steps_in_flight = 1
    assert outputs[True] == outputs[False]
    for spec, out in zip(specs, outs, strict=True):
        if spec is not None:
            assert _fits(spec, out.outputs[0].text), out.outputs[0].text


@pytest.mark.parametrize("max_steps_in_flight", [1, 2])
def test_a_refused_token_mid_batch_fails_only_its_request(llm, max_steps_in_flight):
    """With the grammar thread and steps in flight, the refusal of one request's token
    (min_tokens past the grammar's end) reaches the scheduler; its neighbours, constrained
    or not, finish as they do without it."""
    forced = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4,
                            structured_outputs=StructuredOutputsParams(choice=["quick"]))
    others = [SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(temperature=1.0, seed=9, max_tokens=48,
                             structured_outputs=SPECS[2])]
    llm.engine.max_steps_in_flight = max_steps_in_flight
    try:
        alone = llm.generate(["Hello", "Hello"], others, use_tqdm=False)
        outs = llm.generate(["Hello"] * 3, [forced] + others, use_tqdm=False)
    finally:
        llm.engine.max_steps_in_flight = 1
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].text == "quick"
    for ref, out in zip(alone, outs[1:], strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].finish_reason == ref.outputs[0].finish_reason
    assert not llm.engine.has_unfinished_requests()


def test_preempted_requests_resume_their_grammar_off_the_loop(llm, model_dir):
    """Recompute preemptions with two steps in flight and the grammar thread: the outputs
    equal an undisturbed run with the masks filled on the step loop."""
    from gridllm.llm import LLM

    words = ["Hello", "world", "quick", "brown", "fox", "café", "naïve", "tiny", "model"]
    prompts = [" ".join(words[(k + i) % len(words)] for i in range(16)) for k in range(6)]
    params = _params(13) + _params(17)
    manager = llm.engine.runner.structured_outputs
    manager.set_overlapped(False)
    try:
        reference = llm.generate(prompts, params, use_tqdm=False)
    finally:
        manager.set_overlapped(True)
    small = LLM(model_dir, device="cpu", num_kv_blocks=8, max_model_len=512,
                enable_prefix_caching=False)
    small.engine.max_steps_in_flight = 2
    preempted = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.runner.structured_outputs.timings.num_prefilled_rows > 0
    for ref, out in zip(reference, preempted, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_manager_waits_for_a_compile_still_running(tokenizer, monkeypatch):
    release = threading.Event()
    compile_spec = structured_output._compile_spec

    def slow_compile(compiler, params):
        assert release.wait(30)
        return compile_spec(compiler, params)

    monkeypatch.setattr(structured_output, "_compile_spec", slow_compile)
    manager = StructuredOutputManager(lambda: tokenizer, VOCAB, torch.device("cpu"))
    try:
        grammar = manager.new_request(SamplingParams(structured_outputs=SPECS[1]), EOS, [])
        assert not grammar.is_ready
        threading.Timer(0.2, release.set).start()
        bitmask, rows, failures = manager.prepare([grammar], [3])
        assert manager.num_compile_waits == 1 and manager.compile_wait_seconds > 0.1
        assert not failures and rows.tolist() == [3] and bitmask.shape == (1, VOCAB // 32)
    finally:
        release.set()
        manager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_kernel_path_fits_with_and_without_pipelined_steps(model_dir):
    """The Triton bitmask kernel and the pipelined loop's host read, on a GPU."""
    from gridllm.llm import LLM

    gpu = LLM(model_dir, device="cuda", num_kv_blocks=128, max_model_len=512)
    prompts = ["Hello world", "The quick brown fox", "café"] * 2
    # The GPU draws other samples than the CPU: room for a longer (unbounded) JSON array.
    params = _params(1, 256) + _params(7, 256)
    outputs = {}
    for max_steps_in_flight in (1, 2):
        gpu.engine.max_steps_in_flight = max_steps_in_flight
        outs = gpu.generate(prompts, params, use_tqdm=False)
        outputs[max_steps_in_flight] = [o.outputs[0].token_ids for o in outs]
        for spec, out in zip(SPECS * 2, outs, strict=True):
            assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
            assert _fits(spec, out.outputs[0].text), out.outputs[0].text
    assert outputs[1] == outputs[2]
    assert gpu.engine.runner.structured_outputs.num_masked_steps > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_masks_off_the_loop_give_the_outputs_of_masks_on_the_loop(model_dir):
    """Pinned mask buffers, the ids' copy event waited for on the grammar thread, two steps
    in flight: the outputs equal those with the masks filled on the step loop."""
    from gridllm.llm import LLM

    gpu = LLM(model_dir, device="cuda", num_kv_blocks=128, max_model_len=512)
    gpu.engine.max_steps_in_flight = 2
    prompts = ["Hello world", "The quick brown fox", "café"] * 2
    params = _params(21, 256) + _params(23, 256)
    manager = gpu.engine.runner.structured_outputs
    outputs = {}
    for is_overlapped in (False, True):
        manager.set_overlapped(is_overlapped)
        outs = gpu.generate(prompts, params, use_tqdm=False)
        outputs[is_overlapped] = [o.outputs[0].token_ids for o in outs]
        for spec, out in zip(SPECS * 2, outs, strict=True):
            assert _fits(spec, out.outputs[0].text), out.outputs[0].text
    assert manager.timings.num_prefilled_rows > manager.timings.num_loop_filled_rows
    assert outputs[True] == outputs[False]
