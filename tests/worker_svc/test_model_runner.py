"""ModelRunner against transformers generate: step by step, batched, chunked, resumed."""

from __future__ import annotations

import pytest
import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.contract import NewRequestData, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams
from tests.worker_svc.hf_reference import hf_greedy, hf_prompt_logits
from tests.worker_svc.step_driver import run_requests
from worker_svc.model_runner import ModelRunner

NUM_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=1)


def _runner(model_dir, block_size=4, num_kv_blocks=64, **model_kwargs):
    return ModelRunner(ModelConfig(model=model_dir, device="cpu", **model_kwargs),
                       CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks),
                       SchedulerConfig())


def _prompts(*lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=gen).tolist() for n in lengths]


def _check_against_hf(model_dir, prompts, outputs, steps):
    for i, (prompt, tokens) in enumerate(zip(prompts, outputs, strict=True)):
        want_tokens, want_logits = hf_greedy(model_dir, prompt, NUM_NEW)
        assert tokens == want_tokens, f"prompt {i}"
        # The sampled token's logprob checks the runner's logits at every step.
        got = [s.logprobs[f"req-{i}"][0] for s in steps if f"req-{i}" in s.logprobs]
        want = torch.log_softmax(want_logits, dim=-1)
        for step, entry in enumerate(got):
            assert entry.token_ids[0] == tokens[step]
            assert entry.logprobs[0] == pytest.approx(want[step, tokens[step]].item(), abs=1e-4)


def test_single_prompt_greedy_matches_generate(tiny_model_dir, tiny_arch):
    model_dir = tiny_model_dir(tiny_arch)
    prompts = _prompts(11)
    outputs, steps = run_requests(_runner(model_dir), prompts, GREEDY, NUM_NEW)
    # One prefill step, then one decode per step.
    assert len(steps) == NUM_NEW
    _check_against_hf(model_dir, prompts, outputs, steps)


def test_batched_mixed_lengths_chunked_prefill(tiny_model_dir, tiny_arch):
    model_dir = tiny_model_dir(tiny_arch)
    prompts = _prompts(5, 19, 11, seed=1)
    # A budget of 7 tokens splits the long prompts over several steps and mixes prefill
    # chunks with decodes of the short one.
    outputs, steps = run_requests(_runner(model_dir, block_size=16), prompts, GREEDY,
                                  NUM_NEW, chunk_budget=7)
    _check_against_hf(model_dir, prompts, outputs, steps)


@pytest.mark.parametrize("chunk", [False, True])
def test_triton_kernels_match_generate(tiny_model_dir, tiny_arch, chunk, monkeypatch):
    """The Triton attention backend (the fused rotary + KV write, prefill and split-KV
    decode kernels; Triton's interpreter on a CPU) against transformers; ``chunk``: every
    prompt step through the chunk kernel (``kernels.chunk_attention``), which serves short
    steps on a GPU, where the model's pattern allows it."""
    import kernels.chunk_attention as chunk_kernel

    calls = []
    if chunk:
        monkeypatch.setattr(chunk_kernel, "serves",
                            lambda query, attention_stride, *_: attention_stride is None)
        run = chunk_kernel.chunk_attention
        monkeypatch.setattr(chunk_kernel, "chunk_attention",
                            lambda *a, **k: calls.append(1) or run(*a, **k))
    model_dir = tiny_model_dir(tiny_arch)
    prompts = _prompts(11, 5, seed=9)
    outputs, steps = run_requests(_runner(model_dir, attention_backend="triton"), prompts,
                                  GREEDY, NUM_NEW, chunk_budget=7)
    _check_against_hf(model_dir, prompts, outputs, steps)
    assert bool(calls) == chunk


def test_prompt_logprobs_over_chunks(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompt = _prompts(13, seed=2)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    _, steps = run_requests(_runner(model_dir), [prompt], params, 2, chunk_budget=5)
    entries = [e for s in steps for e in s.prompt_logprobs.get("req-0", [])]
    assert len(entries) == len(prompt) - 1
    want = torch.log_softmax(hf_prompt_logits(model_dir, prompt), dim=-1)
    for p, entry in enumerate(entries, start=1):
        row = want[p - 1]
        assert entry.token_ids[0] == prompt[p]
        assert entry.logprobs[0] == pytest.approx(row[prompt[p]].item(), abs=1e-4)
        assert entry.ranks[0] == int((row > row[prompt[p]]).sum()) + 1
        assert entry.token_ids[1:] == row.topk(3).indices.tolist()


def test_resumed_request_continues_like_generate(tiny_model_dir):
    """A request dropped and resent with its output so far (preemption by recompute)."""
    model_dir = tiny_model_dir("llama")
    prompt = _prompts(9, seed=3)[0]
    runner = _runner(model_dir)
    (first,), _ = run_requests(runner, [prompt], GREEDY, 3)
    resumed = prompt + first
    out = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData(req_id="again", prompt_token_ids=prompt,
                                           sampling_params=GREEDY, output_token_ids=first,
                                           block_ids=[40, 41, 42], num_computed_tokens=0)],
        num_scheduled_tokens={"again": len(resumed)}, total_num_scheduled_tokens=len(resumed),
        finished_req_ids={"req-0"})
    result = runner.execute_model(out)
    assert "req-0" not in runner.requests
    want, _ = hf_greedy(model_dir, prompt, 4)
    assert first + result.sampled_token_ids["again"] == want
    assert runner.requests["again"].output_token_ids == want


def test_seeded_sampling_reproduces(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(6, seed=4) * 2
    params = SamplingParams(temperature=1.5, seed=123, max_tokens=NUM_NEW)
    first, _ = run_requests(_runner(model_dir), prompts, params, NUM_NEW)
    second, _ = run_requests(_runner(model_dir, seed=99), prompts, params, NUM_NEW)
    # Same prompt and seed: same tokens, in one batch and across runners.
    assert first[0] == first[1] == second[0] == second[1]


def test_seeded_request_ignores_its_batch_and_resumes_exactly(tiny_model_dir):
    """Draws are keyed by (seed, output position): the same tokens alone, in a crowd, from
    another runner, and from a fresh runner given the prompt and the tokens so far."""
    model_dir = tiny_model_dir("llama")
    prompt, other_a, other_b = _prompts(7, 12, 3, seed=5)
    seeded = SamplingParams(temperature=1.0, top_k=60, top_p=0.95, seed=2024)

    def runner(seed):
        return _runner(model_dir, seed=seed)

    (alone,), _ = run_requests(runner(0), [prompt], seeded, NUM_NEW)
    crowd = [SamplingParams(temperature=0.9), seeded, SamplingParams(temperature=1.2, seed=7)]
    in_crowd, _ = run_requests(runner(1), [other_a, prompt, other_b], crowd, NUM_NEW,
                               chunk_budget=9)
    assert in_crowd[1] == alone
    (rest,), _ = run_requests(runner(2), [prompt], seeded, NUM_NEW,
                              resumed_outputs=[alone[:3]])
    assert alone[:3] + rest == alone
    (reseeded,), _ = run_requests(runner(0), [prompt], seeded.clone(seed=2025), NUM_NEW)
    assert reseeded != alone


def test_kv_cache_sizing_and_layout(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    explicit = _runner(model_dir, num_kv_blocks=10)
    assert explicit.num_kv_blocks == 10
    key_cache, value_cache = explicit.kv_caches[0]
    # qwen3 tiny: 2 kv heads, head_dim 32.
    assert key_cache.shape == value_cache.shape == (10, 4, 2, 32)
    assert len(explicit.kv_caches) == explicit.hf_config.num_hidden_layers
    sized = ModelRunner(ModelConfig(model=model_dir, device="cpu"),
                        CacheConfig(block_size=4, kv_cache_memory=1 << 20), SchedulerConfig())
    assert sized.num_kv_blocks == (1 << 20) // sized.bytes_per_block()
    assert sized.bytes_per_block() == 2 * 2 * 4 * 2 * 32 * 4
    assert sized.vocab_size == 320 and sized.max_model_len == 256
    assert sized.dtype == torch.float32 and sized.device.type == "cpu"


def test_max_model_len_limits(tiny_model_dir):
    model_dir = tiny_model_dir("opt")
    assert _runner(model_dir, max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match="max_model_len"):
        _runner(model_dir, max_model_len=257)


def test_warm_up_runs_the_serving_path_and_leaves_no_state(tiny_model_dir):
    """The CUDA warm-up's dummy forwards and steps (here through Triton's interpreter)
    leave no request behind, and generation afterwards is exact."""
    from worker_svc.warmup import warm_up_kernels, warm_up_steps

    model_dir = tiny_model_dir("qwen3")
    runner = _runner(model_dir, attention_backend="triton", max_model_len=64)
    warm_up_kernels(runner)
    warm_up_steps(runner)
    assert not runner.requests and runner.input_batch.num_reqs == 0
    assert runner.input_batch.prompt_mask is None  # penalty tables are allocated on demand
    prompts = _prompts(6, seed=10)
    outputs, steps = run_requests(runner, prompts, GREEDY, NUM_NEW)
    _check_against_hf(model_dir, prompts, outputs, steps)


@pytest.mark.parametrize("num_sms", [1, 16, 132])
@pytest.mark.parametrize("vocab", [512, 151936, 4_000_000])
def test_warm_up_draws_build_the_sampling_variants_of_every_batch_size(monkeypatch, num_sms,
                                                                        vocab):
    """Every batch size up to the largest draws with the chunks loaded whole, or not, as
    one of the warm-up's draw batches does."""
    import types

    import kernels.sampling as sampling
    from worker_svc.warmup import _draw_rows

    monkeypatch.setattr(sampling, "num_sms", lambda device: num_sms)
    runner = types.SimpleNamespace(vocab_size=vocab, device=torch.device("cuda"),
                                   scheduler_config=types.SimpleNamespace(max_num_seqs=64))
    warm = _draw_rows(runner)
    assert all(1 <= n <= 64 for n in warm)
    whole = sampling.max_whole_rows(vocab, runner.device)
    sides = {n <= whole for n in warm}
    assert sides == {n <= whole for n in range(1, 65)}, (warm, whole)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_warm_up_samples_logits_laid_out_as_served_ones(monkeypatch, world_size, dtype):
    """The warm-up's sampler calls read logits of every dtype and row stride a served step
    hands the sampler: the LM head's output (a vocabulary the tensor-parallel ranks pad to
    a wider row) and the float32 copy the sampler makes of it; its draws launch every
    pass of the top-k and top-p searches (a batch without one launches its first only)."""
    import dataclasses
    import types

    import worker_svc.warmup as warmup
    from worker_svc.parallel.layers import ParallelLMHead
    from worker_svc.parallel.state import ParallelState, building

    @dataclasses.dataclass(frozen=True)
    class Gathering(ParallelState):  # all_gather's layout, without a process group
        def all_gather(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x] * self.world_size, dim=-1)

    vocab = 1001
    with building(Gathering(rank=0, world_size=world_size)):
        head = ParallelLMHead(8, vocab).to(dtype)
    served = head(torch.zeros(2, 8, dtype=dtype))
    assert served.shape == (2, vocab)
    layouts = {(x.dtype, x.stride(0)) for x in (served, served.to(torch.float32, copy=True))}
    seen = set()
    draws = []

    def sampler(logits, metadata):
        assert logits.shape[1] == vocab
        seen.add((logits.dtype, logits.stride(0)))
        if not metadata.all_greedy:
            draws.append((metadata.no_top_k, metadata.no_top_p))

    monkeypatch.setattr(warmup, "_draw_rows", lambda runner: [2])
    runner = types.SimpleNamespace(
        dtype=dtype, vocab_size=vocab, device=torch.device("cpu"), max_model_len=16,
        block_size=4, eos_token_id=0, model=types.SimpleNamespace(lm_head=head),
        sampler=sampler)
    warmup._warm_up_sampling_kernels(runner)
    assert layouts <= seen, (layouts, seen)
    assert draws and set(draws) == {(False, False)}


@pytest.mark.parametrize("split", [True, False])
def test_warm_up_builds_eager_decode_variants_where_mixed_steps_launch_them(monkeypatch,
                                                                            split):
    """With CUDA graphs covering every decode batch, the eager decode variants are built
    only where mixed steps send their one-query requests to the decode kernel."""
    import types

    import kernels.prefill_attention as pa
    from worker_svc.warmup import _has_eager_decode

    monkeypatch.setattr(pa, "SPLIT_ONE_TOKEN", split)
    runner = types.SimpleNamespace(
        model_config=types.SimpleNamespace(enforce_eager=False),
        scheduler_config=types.SimpleNamespace(max_num_seqs=256),
        device=torch.device("cuda"))
    assert _has_eager_decode(runner) == split
    runner.model_config.enforce_eager = True
    assert _has_eager_decode(runner)


@pytest.mark.parametrize("one_warp", [False, True])
def test_warm_up_builds_the_split_counts_of_the_kernel_that_serves(monkeypatch,
                                                                   tiny_model_dir, one_warp):
    """The eager decode variants are built at the contexts where the kernel serving the
    cache changes its split count: the one-warp Gluon kernel over an FP8 cache has its own
    rule (fewer keys a split), so its contexts, not the tl.dot kernel's."""
    import worker_svc.warmup as warmup
    from kernels.paged_decode_attention import pick_num_splits

    runner = _runner(tiny_model_dir("qwen3"), attention_backend="triton", max_model_len=64)
    monkeypatch.setattr(runner, "one_warp_decode", lambda: one_warp)
    seen = []
    real_forward = runner.dummy_forward

    def dummy_forward(num_tokens, kv_caches, **kwargs):
        if num_tokens == 1 and "seq_len" in kwargs:
            seen.append(kwargs["seq_len"])
        return real_forward(num_tokens, kv_caches, **kwargs)

    monkeypatch.setattr(runner, "dummy_forward", dummy_forward)
    warmup.warm_up_kernels(runner)
    _, num_kv_heads, _ = runner.kv_geometry()
    wanted = {pick_num_splits(1, num_kv_heads, n, runner.device, one_warp)
              for n in range(1, runner.max_model_len + 1)}
    assert {pick_num_splits(1, num_kv_heads, n, runner.device, one_warp)
            for n in seen} == wanted


def test_warm_up_builds_the_fp8_weight_only_row_classes(monkeypatch, tiny_model_dir):
    """FP8 projections that run kernels get a step of each row class of the weight-only
    ``tl.dot`` kernel (past the GEMV's row, or past the tensor-core GEMV's 8 rows where that
    runs; 16, a count Triton specialises), within the step limit; none without them."""
    from kernels import fp8_mma_gemv
    from worker_svc.layers.quantization import Fp8Linear
    from worker_svc.warmup import _fp8_weight_only_rows

    runner = _runner(tiny_model_dir("llama"), quantization="fp8")
    layers = [m for m in runner.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and _fp8_weight_only_rows(runner, 64) == []  # the CPU: no e4m3 kernels
    for layer in layers:
        monkeypatch.setattr(layer, "is_fp8_native", True)
    assert _fp8_weight_only_rows(runner, 64) == [2, 3, 16]
    monkeypatch.setattr(fp8_mma_gemv, "runs_on", lambda device: True)
    assert _fp8_weight_only_rows(runner, 64) == [9, 10, 16]
    assert _fp8_weight_only_rows(runner, 12) == [9, 10]
    monkeypatch.setattr(fp8_mma_gemv, "ENABLED", False)
    assert _fp8_weight_only_rows(runner, 64) == [2, 3, 16]
