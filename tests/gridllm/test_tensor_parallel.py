"""LLM(tensor_parallel_size=T) on the CPU (gloo): every sharded tiny architecture gives the
single-device greedy ids at T=2 and T=4 (KV heads split at 2, replicated at 4), seeded
sampling draws the same ids on every rank, and a killed rank, or a step that fails on some
ranks only, fails the engine cleanly."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time

import pytest

from gridllm import LLM, SamplingParams
from gridllm.common.procs import HAS_PROC, is_running
from tests.gridllm import rank_failures
from tests.gridllm.test_llm import prompts_of, token_prompts
from tests.worker_svc.tiny_models import ALL_TINY_ARCHS

pytestmark = pytest.mark.slow

SHARDED_ARCHS = ["llama", "llama3", "mistral", "mistral-w12", "qwen2", "qwen2-sliding",
                 "qwen3", "gemma2", "gemma3", "opt", "opt-350m"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Small blocks and step budget: chunked prefill, mixed steps, windows crossing blocks.
ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=96, max_num_batched_tokens=24,
              skip_tokenizer_init=True)
PROMPTS = prompts_of([3, 21, 9, 30])

_references: dict[str, list[list[int]]] = {}
# Block ids of a single device's pool: ENGINE's num_kv_blocks, or more with a hybrid KV
# layout (an id holds one KV group's layers).
_num_kv_blocks: dict[str, int] = {}


def greedy_ids(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids
            for o in llm.generate(token_prompts(prompts), params, use_tqdm=False)]


def reference(arch: str, model_dir: str) -> list[list[int]]:
    if arch not in _references:
        llm = LLM(model_dir, **ENGINE)
        _references[arch] = greedy_ids(llm)
        num_blocks = llm.engine.runner.num_kv_blocks
        assert (num_blocks == ENGINE["num_kv_blocks"]
                or llm.engine.scheduler.limits.kv_group_windows)
        _num_kv_blocks[arch] = num_blocks
    return _references[arch]


def prompt_top1(llm: LLM, prompts) -> list[int]:
    """The top-1 token at every prompt position after the first (teacher-forced)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    return [max(d, key=lambda t: d[t].logprob)
            for o in llm.generate(token_prompts(prompts), params, use_tqdm=False)
            for d in o.prompt_logprobs[1:]]


def agreement_of(got: list[int], expected: list[int]) -> float:
    return sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)


def assert_processes_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(is_running(p) for p in pids):
        assert time.monotonic() < deadline, f"rank processes {pids} still running"
        time.sleep(0.05)


@pytest.fixture
def processor_params(monkeypatch):
    """Registers a logits processor (unregistered after the test) and returns greedy params
    that enable it; register before building the engine (its followers take the registry
    as it stands)."""
    from worker_svc import logits_processors

    def register(fn, verify=None) -> SamplingParams:
        name = f"test_{fn.__name__}"
        monkeypatch.setitem(logits_processors._REGISTRY, name,
                            logits_processors.LogitsProcessorSpec(name, fn, verify))
        return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                              logits_processors=[name])
    return register


def generate_bounded(llm: LLM, params: SamplingParams, timeout_s: float = 60.0
                     ) -> BaseException | None:
    """``greedy_ids(llm, params=params)`` in a thread; what it raised. A step still running
    after ``timeout_s`` (rank 0 waiting in a collective) fails the test, its ranks killed so
    the thread ends."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            greedy_ids(llm, params=params)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for pid in llm.engine.runner.follower_pids:
            os.kill(pid, signal.SIGKILL)
        thread.join(30.0)
        pytest.fail(f"the step did not end within {timeout_s:.0f}s")
    return raised[0] if raised else None


def test_sharded_archs_cover_every_sharded_architecture():
    from worker_svc.models import sharded_architectures

    # Gemma3TextConfig -> Gemma3ForCausalLM (the text model's architecture name).
    covered = {ALL_TINY_ARCHS[a][0].replace("TextConfig", "Config").replace(
        "Config", "ForCausalLM") for a in SHARDED_ARCHS}
    assert covered == set(sharded_architectures())


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("arch", SHARDED_ARCHS)
def test_greedy_ids_equal_a_single_device(arch, size, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    expected = reference(arch, model_dir)
    with LLM(model_dir, tensor_parallel_size=size, **ENGINE) as llm:
        pids = llm.engine.runner.follower_pids
        assert len(pids) == size - 1 and all(is_running(p) for p in pids)
        assert llm.engine.runner.num_kv_blocks == _num_kv_blocks[arch]
        assert greedy_ids(llm) == expected
        stats = llm.engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
    assert_processes_gone(pids)


def test_seeded_sampling_and_logprobs_equal_a_single_device(tiny_model_dir):
    """Every rank samples: with the same seeds they draw the ids one device draws."""
    model_dir = tiny_model_dir("qwen2")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=10,
                            ignore_eos=True, logprobs=3, prompt_logprobs=2)
    # Unseeded requests draw their keys from the engine seed's generator.
    unseeded = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, n=2)
    prompts = token_prompts(prompts_of([7, 15], seed=3))

    def run(llm):
        outputs = llm.generate(prompts, seeded, use_tqdm=False)
        outputs += llm.generate(prompts, unseeded, use_tqdm=False)
        return outputs

    expected = run(LLM(model_dir, seed=5, **ENGINE))
    with LLM(model_dir, seed=5, tensor_parallel_size=2, **ENGINE) as llm:
        got = run(llm)
    for want, have in zip(expected, got, strict=True):
        assert [c.token_ids for c in have.outputs] == [c.token_ids for c in want.outputs]
        for w, h in zip(want.outputs[0].logprobs or [], have.outputs[0].logprobs or [],
                        strict=True):
            assert w.keys() == h.keys()
            assert all(abs(w[t].logprob - h[t].logprob) < 1e-4 for t in w)
        for w, h in zip(want.prompt_logprobs or [], have.prompt_logprobs or [], strict=True):
            assert (w is None) == (h is None)
            if w is not None:
                assert all(abs(w[t].logprob - h[t].logprob) < 1e-4 for t in w)


def test_random_preset_ranks_hold_slices_of_the_same_weights():
    engine = dict(ENGINE, num_kv_blocks=64)
    prompts = prompts_of([5, 12], vocab=512)
    expected = greedy_ids(LLM("random:tiny", **engine), prompts)
    with LLM("random:tiny", tensor_parallel_size=2, **engine) as llm:
        assert greedy_ids(llm, prompts) == expected


@pytest.mark.parametrize("write", ["fails", "skipped"])
def test_a_step_after_every_rank_is_gone_names_the_killed_one(tiny_model_dir, monkeypatch,
                                                               write):
    """Every follower gone before the monitor has named the lost one (its grace period
    widened here): whether the step's write fails (a broken pipe) or, skipped here as when
    a dead reader's pipe still takes the bytes, rank 0's all-reduce fails ("connection
    reset"), the error waits for the monitor and says which rank a signal ended."""
    from worker_svc.ranks import launch

    monkeypatch.setattr(launch, "_CAUSE_GRACE_S", 1.0)
    llm = LLM(tiny_model_dir("llama"), tensor_parallel_size=4, **ENGINE)
    try:
        pids = llm.engine.runner.follower_pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert_processes_gone(pids)
        if write == "skipped":
            monkeypatch.setattr(launch._Ranks, "send", lambda self, message: None)
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank \d \(pid \d+\) exited "
                                               r"with code -9"):
            greedy_ids(llm)
    finally:
        monkeypatch.undo()
        llm.shutdown()


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")
def test_a_follower_counts_as_exited_before_its_exit_code_arrives():
    """A forkserver's child's exit code reaches rank 0 late (the forkserver reaps it): a
    killed process not reaped yet (a zombie) already counts as exited, a live one not."""
    import subprocess
    from types import SimpleNamespace

    from worker_svc.ranks.launch import _exited

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not _exited(SimpleNamespace(exitcode=None, pid=child.pid))
        os.kill(child.pid, signal.SIGKILL)
        assert_processes_gone([child.pid])  # a zombie: not reaped until wait() below
        assert _exited(SimpleNamespace(exitcode=None, pid=child.pid))
    finally:
        child.kill()
        child.wait()
    assert _exited(SimpleNamespace(exitcode=None, pid=child.pid))  # reaped: no /proc entry
    assert _exited(SimpleNamespace(exitcode=-9, pid=None))
    assert not _exited(SimpleNamespace(exitcode=None, pid=None))


def test_a_killed_rank_fails_the_engine_and_stops_the_others(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = LLM(model_dir, tensor_parallel_size=4, **ENGINE)
    try:  # shut down even on a failure: this process may hold one group at a time
        pids = llm.engine.runner.follower_pids
        os.kill(pids[1], signal.SIGKILL)
        assert_processes_gone(pids)  # the monitor kills the other ranks
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 2 \(pid \d+\) "
                                               r"exited with code -9"):
            greedy_ids(llm)
    finally:
        llm.shutdown()
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith("gridllm-tp")]
    # The group is left: this process can start another engine.
    with LLM(model_dir, tensor_parallel_size=2, **ENGINE) as again:
        assert greedy_ids(again) == reference("llama", model_dir)


@pytest.mark.parametrize(("fn", "verify", "message"), [
    # A follower fails after the step's collectives: rank 0 finishes the step.
    (rank_failures.raise_on_followers, None,
     r"tensor-parallel rank 1's step failed while rank 0's did not: "
     r"RuntimeError: sampling failed on rank 1 alone"),
    # A follower fails before the step's first collective: rank 0 waits in it.
    (rank_failures.keep, rank_failures.refuse_on_followers,
     r"tensor-parallel rank 1's step failed while rank 0's did not: "
     r"RuntimeError: admission failed on rank 1 alone"),
    # Rank 0 fails after the collectives, its follower not.
    (rank_failures.raise_on_rank0, None,
     r"tensor-parallel rank 0's step failed while rank 1's did not: "
     r"RuntimeError: sampling failed on rank 0 alone"),
], ids=["follower-after-collectives", "follower-before-collectives", "rank0-alone"])
def test_a_step_that_fails_on_some_ranks_only_fails_the_engine(fn, verify, message,
                                                                tiny_model_dir,
                                                                processor_params):
    """The ranks would diverge (or rank 0 would wait for ever): the engine stops, naming
    the rank and its error, and the process can start another engine."""
    model_dir = tiny_model_dir("llama")
    params = processor_params(fn, verify)
    llm = LLM(model_dir, tensor_parallel_size=2, **ENGINE)
    try:
        pids = llm.engine.runner.follower_pids
        raised = generate_bounded(llm, params)
        assert isinstance(raised, RuntimeError), raised
        assert re.search(message, str(raised)), str(raised)
        assert_processes_gone(pids)
        with pytest.raises(RuntimeError, match=message):  # the engine stays stopped
            greedy_ids(llm)
    finally:
        llm.shutdown()
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith("gridllm-tp")]
    assert not [t for t in threading.enumerate() if t.name == "tp-rank-monitor"]
    with LLM(model_dir, tensor_parallel_size=2, **ENGINE) as again:
        assert greedy_ids(again) == reference("llama", model_dir)


def test_a_step_that_fails_on_every_rank_raises_and_leaves_the_engine_usable(
        tiny_model_dir, processor_params, monkeypatch):
    """A bad step: every rank raises the same step, rank 0 raises its error (at once, not
    after waiting out the grace period, widened here so a slow host cannot mistake one for
    the other) and the group stays in step."""
    from worker_svc.ranks import launch

    monkeypatch.setattr(launch, "_STEP_FAILURE_GRACE_S", 30.0)
    model_dir = tiny_model_dir("llama")
    params = processor_params(rank_failures.raise_on_every_rank)
    with LLM(model_dir, tensor_parallel_size=4, **ENGINE) as llm:
        pids = llm.engine.runner.follower_pids
        started = time.monotonic()
        raised = generate_bounded(llm, params)
        assert time.monotonic() - started < launch._STEP_FAILURE_GRACE_S
        assert isinstance(raised, RuntimeError), raised
        assert str(raised) == "sampling failed on every rank"
        assert all(is_running(p) for p in pids)
        assert greedy_ids(llm) == reference("llama", model_dir)
    assert_processes_gone(pids)


@pytest.mark.parametrize(("size", "message"), [
    (3, "attention heads"),  # 4 heads
    (8, "attention heads"),
])
def test_a_size_the_model_cannot_be_split_by_is_refused_before_any_process_starts(
        size, message, tiny_model_dir):
    with pytest.raises(ValueError, match=f"tensor_parallel_size must divide the model's "
                                         f"4 {message}, got {size}"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=size, **ENGINE)
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith("gridllm-tp")]


def test_fp8_weights_and_cache_shard_too(tiny_model_dir):
    """FP8 at T=2: each rank holds its shard of the e4m3 weights (quantized per whole row
    as the checkpoint streams in) and quantizes its activations per token over its share
    of the features (a row-parallel shard over its half, so activation scales differ from
    one device's and close logits may flip); losing the all-reduce or adding the bias twice
    would change nearly every prediction. Measured teacher-forced: the top-1 token at every
    prompt position."""
    model_dir = tiny_model_dir("qwen2")  # q/k/v biases: column-parallel, on every rank
    fp8 = dict(ENGINE, quantization="fp8", kv_cache_dtype="fp8")
    prompts = prompts_of([30, 24, 27], seed=4)
    expected = prompt_top1(LLM(model_dir, **fp8), prompts)
    with LLM(model_dir, tensor_parallel_size=2, **fp8) as llm:
        agreement = agreement_of(prompt_top1(llm, prompts), expected)
    assert agreement >= 0.8, agreement


def test_each_rank_calculates_its_own_kv_cache_scales(tiny_model_dir, tmp_path):
    """calculate_kv_scales at T=2: every rank runs the calibration prefills together (their
    all-reduces pair up) and scales its FP8 cache by its own KV heads' largest keys and
    values. Keys and values 4096 times too large for e4m3 then give the top-1 tokens of
    the unscaled model on one device (scales of 1.0 would saturate them)."""
    from gridllm.bench.quant_accuracy import write_rescaled_kv_checkpoint

    model_dir = tiny_model_dir("llama-bias")
    scaled = write_rescaled_kv_checkpoint(model_dir, str(tmp_path / "scaled"), 2.0 ** 12)
    fp8 = dict(ENGINE, kv_cache_dtype="fp8", calculate_kv_scales=True)
    prompts = prompts_of([30, 24, 27], seed=5)
    expected = prompt_top1(LLM(model_dir, **ENGINE), prompts)
    with LLM(scaled, tensor_parallel_size=2, **fp8) as llm:
        agreement = agreement_of(prompt_top1(llm, prompts), expected)
    assert agreement >= 0.8, agreement
    with LLM(scaled, tensor_parallel_size=2, **dict(fp8, calculate_kv_scales=False)) as llm:
        ruined = agreement_of(prompt_top1(llm, prompts), expected)
    print(f"agreement {agreement:.3f}, with scales of 1.0 {ruined:.3f}")
    assert ruined < 0.5


def test_an_fp8_checkpoint_shards_its_stored_weights(tiny_model_dir, tmp_path):
    """An FP8 checkpoint (per-channel scales) at T=2: each rank holds its rows and scales
    of the merged column-parallel layers and its columns of the row-parallel ones (whose
    bias rank 0 alone adds), and its shard of a layer the checkpoint keeps float (built on
    the meta device, then allocated). With steps of at most 16 tokens only the weights are
    quantized, so both give the greedy ids of the dequantized float checkpoint on one
    device; a scale on the wrong rows or a bias added twice changes them."""
    from tests.worker_svc.fp8_checkpoints import COMPRESSED_TENSORS_CHANNEL, write_fp8_checkpoint

    keep = "model.layers.1.mlp.down_proj"
    path = write_fp8_checkpoint(tiny_model_dir("llama-bias"), str(tmp_path / "fp8"),
                                dict(COMPRESSED_TENSORS_CHANNEL, ignore=["lm_head", keep]),
                                keep=(keep,))
    engine = dict(ENGINE, max_num_batched_tokens=16)
    prompts = prompts_of([3, 16, 9, 12])
    expected = greedy_ids(LLM(path + "-ref", **engine), prompts)
    with LLM(path, tensor_parallel_size=2, **engine) as llm:
        pids = llm.engine.runner.follower_pids
        assert greedy_ids(llm, prompts) == expected
    assert_processes_gone(pids)
