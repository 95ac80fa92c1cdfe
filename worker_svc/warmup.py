"""Build every Triton kernel variant and first-use buffer of the serving path before the
worker reports SERVING (the runner's constructor calls these on CUDA).

Triton compiles a kernel once per set of ``tl.constexpr`` values and per specialisation
of its integer arguments (== 1, divisible by 16) and pointer alignments. What varies
between steps on the serving path:
- prefill attention: its query tile (``BLOCK_M``: 16 ... 256, from the longest query
  chunk), its tile count (1, or more at 256) and the block table's row stride (the input
  batch pads it to a multiple of 16, capped at the longest request's table); short steps
  take the chunk kernel (``kernels.chunk_attention``), whose merge runs only where the
  context is long enough to split;
- eager decode attention (no CUDA graphs, a batch above the largest graph, or a mixed
  step's one-query requests): its split-KV count, a power of two picked from the batch
  and the context;
- decode-sized linear products (the GEMV kernel, ``ops.GEMV_MAX_ROWS``): one variant per
  row count, the LM head's included; FP8 projections past the tensor-core GEMV's rows
  (``kernels.fp8_gemv``, up to 16): a count of 16 and the others;
- the sampling kernel: with and without penalties (its 16 radix passes are one variant
  each), over few rows (every chunk loaded whole) and more; the token-bitmask kernel of
  structured outputs (one variant);
everything else has one variant per model. CUDA graphs are captured separately
(``CudaGraphRunner.capture``), then real steps run through the whole path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from gridllm.common.contract import CachedRequestData, NewRequestData, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams
from kernels import chunk_attention, fp8_mma_gemv, prefill_attention
from worker_svc.cuda_graph import context_classes
from worker_svc.input_batch import InputBatch
from worker_svc.layers import ops
from worker_svc.layers.quantization import WEIGHT_ONLY_MAX_ROWS, Fp8Linear
from worker_svc.request_state import RequestState

# The model runner (worker_svc.model_runner.ModelRunner, which imports this module).
ModelRunner = Any

logger = logging.getLogger(__name__)

# Query chunk lengths that pick each prefill tile (BLOCK_M 16, 32, 64, 128, 256), then
# 256-token tiles: 2 tiles, 16 tiles (Triton specialises a count divisible by 16).
_PREFILL_LENGTHS = (2, 17, 33, 65, 129, 257, 16 * 256)


def block_table_widths(max_blocks_per_req: int, num_blocks: int) -> list[int]:
    """One block-table width per stride class a step may have (see InputBatch.prepare)
    that holds ``num_blocks`` blocks."""
    aligned = -(-max(num_blocks, 1) // 16) * 16
    widths = {max_blocks_per_req}
    if aligned < max_blocks_per_req:
        widths.add(aligned)
    return sorted(widths)


@torch.inference_mode()
def warm_up_kernels(runner: ModelRunner) -> None:
    """Compile the attention kernels' variants with dummy forwards (no request state)."""
    start = time.perf_counter()
    limit = min(runner.scheduler_config.max_num_batched_tokens, runner.max_model_len - 1,
                runner.num_kv_blocks * runner.block_size)
    max_blocks = runner.input_batch.max_blocks_per_req
    for num_tokens in _PREFILL_LENGTHS:
        if num_tokens > limit:
            break
        for width in block_table_widths(max_blocks, -(-num_tokens // runner.block_size)):
            runner.dummy_forward(num_tokens, runner.kv_caches, width=width)
    # A short step over a context the chunk kernel splits (its merge kernel).
    context = min(runner.max_model_len, runner.num_kv_blocks * runner.block_size,
                  4 * chunk_attention.MIN_KEYS_PER_SPLIT)
    if limit >= 2 and context >= 2 * chunk_attention.MIN_KEYS_PER_SPLIT:
        for width in block_table_widths(max_blocks, -(-context // runner.block_size)):
            runner.dummy_forward(2, runner.kv_caches, width=width, seq_len=context)
    for rows in range(1, min(ops.GEMV_MAX_ROWS, limit) + 1):
        runner.dummy_forward(rows, runner.kv_caches, logits_rows=rows)
    for rows in _fp8_weight_only_rows(runner, limit):
        runner.dummy_forward(rows, runner.kv_caches, logits_rows=rows)
    if _has_eager_decode(runner):
        _, num_kv_heads, _ = runner.kv_geometry()  # this rank's, as the kernel sees them
        # A batch of one reaches every split count a bigger batch can (by the rule of the
        # kernel that serves the cache).
        contexts = context_classes(1, num_kv_heads, runner.max_model_len, runner.device,
                                   runner.one_warp_decode())
        for context in contexts.values():
            for width in block_table_widths(max_blocks, -(-context // runner.block_size)):
                runner.dummy_forward(1, runner.kv_caches, width=width, seq_len=context)
    _synchronize(runner.device)
    logger.info("Triton kernel variants built in %.1f s", time.perf_counter() - start)


def _fp8_weight_only_rows(runner: ModelRunner, limit: int) -> list[int]:
    """Step sizes, up to ``limit``, that build the variants of the FP8 weight-only
    ``tl.dot`` kernel (``kernels.fp8_gemv``: the rows past the GEMV's and the tensor-core
    GEMV's, up to ``WEIGHT_ONLY_MAX_ROWS``; Triton specialises a count of 1 and one
    divisible by 16) where the model holds FP8 projections that run kernels; none
    otherwise."""
    if not any(isinstance(m, Fp8Linear) and m.is_fp8_native for m in runner.model.modules()):
        return []
    mma = fp8_mma_gemv.ENABLED and fp8_mma_gemv.runs_on(runner.device)
    first = (fp8_mma_gemv.MAX_ROWS if mma else ops.GEMV_MAX_ROWS) + 1
    last = min(limit, WEIGHT_ONLY_MAX_ROWS)
    return sorted(rows for rows in {first, first + 1, WEIGHT_ONLY_MAX_ROWS} if rows <= last)


def _has_eager_decode(runner: ModelRunner) -> bool:
    # The graphs cover decode batches up to their largest size; a step that mixes prompt
    # chunks with one-query requests sends those to the decode kernel eagerly (the split in
    # kernels.prefill_attention), at any batch and context.
    return (runner.model_config.enforce_eager or runner.device.type != "cuda"
            or runner.scheduler_config.max_num_seqs > 256
            or prefill_attention.SPLIT_ONE_TOKEN)


@torch.inference_mode()
def warm_up_steps(runner: ModelRunner) -> None:
    """Real steps through the serving path (input staging, graphs or eager forward,
    sampling kernel with and without penalties, logprobs), then forget them."""
    num_groups = runner.kv_groups.num_groups
    if runner.num_kv_blocks < 4 * num_groups or runner.max_model_len < runner.block_size + 2:
        return
    prompt = [0] * runner.block_size

    def block_id(step: int, row: int, group: int) -> int:
        # Distinct per step, request and KV group.
        return (step * 2 + row) * num_groups + group

    params = [SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.01, logprobs=2,
                             seed=1),
              SamplingParams(temperature=0.0, prompt_logprobs=1)]
    first = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData(
            f"warm-up-{i}", prompt, p, [], [block_id(0, i, 0)], 0,
            [[block_id(0, i, g)] for g in range(1, num_groups)])
            for i, p in enumerate(params)],
        num_scheduled_tokens={f"warm-up-{i}": len(prompt) for i in range(len(params))},
        total_num_scheduled_tokens=len(prompt) * len(params))
    pending = runner.execute_model_async(first)
    decode = SchedulerOutput(
        scheduled_cached_reqs=[CachedRequestData(
            f"warm-up-{i}", [block_id(1, i, 0)], len(prompt),
            [[block_id(1, i, g)] for g in range(1, num_groups)])
            for i in range(len(params))],
        num_scheduled_tokens={f"warm-up-{i}": 1 for i in range(len(params))},
        total_num_scheduled_tokens=len(params))
    runner.execute_model_async(decode).get_output()
    pending.get_output()
    runner.reset_requests()
    _warm_up_sampling_kernels(runner)
    _warm_up_token_bitmask(runner)
    _synchronize(runner.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_sampling_kernels(runner: ModelRunner) -> None:
    # The argmax and sampling kernels read the logits as the LM head wrote them (the
    # model's dtype), or a float32 copy where a mask or logprobs made one (and Gemma's soft
    # cap writes float32): their variants for both, draws with penalties and without.
    # Batches of their own: the runner's penalty tables stay unallocated until a request
    # asks for penalties. Draws over few rows load every chunk whole (variants of their
    # own): a batch on each side of that. Top-k and top-p on, so that every pass of both
    # searches launches (a batch without one launches only its first).
    for layout in _logits_layouts(runner):
        _warm_up_sampling(runner, SamplingParams(temperature=0.0), 1, layout)
        for num_reqs in _draw_rows(runner):
            _warm_up_sampling(runner, SamplingParams(temperature=0.7, top_k=40, top_p=0.8),
                              num_reqs, layout)
            _warm_up_sampling(runner, SamplingParams(temperature=0.7, top_k=40, top_p=0.8,
                                                     repetition_penalty=1.2,
                                                     frequency_penalty=0.1), num_reqs, layout)


def _logits_layouts(runner: ModelRunner) -> list[tuple[torch.dtype, int]]:
    """The dtypes and row strides the sampler's logits come in: the LM head's, a row of
    the vocabulary padded to the tensor-parallel ranks (the kernels specialize on a stride
    divisible by 16), and a contiguous float32 copy."""
    head = (runner.dtype, runner.model.lm_head.logits_width)
    return list(dict.fromkeys((head, (torch.float32, runner.vocab_size))))


def _draw_rows(runner: ModelRunner) -> list[int]:
    """Batch sizes that build the sampling kernel's variants a draw can launch: every chunk
    loaded whole (``kernels.sampling.max_whole_rows``) or not."""
    from kernels.sampling import max_whole_rows

    whole = max_whole_rows(runner.vocab_size, runner.device)
    return list(dict.fromkeys((max(1, min(2, whole)),
                               min(whole + 1, runner.scheduler_config.max_num_seqs))))


def _warm_up_sampling(runner: ModelRunner, params: SamplingParams, num_reqs: int,
                      layout: tuple[torch.dtype, int]) -> None:
    """The sampler over zero logits of ``num_reqs`` requests with ``params``, in a batch
    of their own; ``layout``: the logits' dtype and row stride."""
    batch = InputBatch(num_reqs, runner.max_model_len, runner.block_size, runner.vocab_size,
                       runner.device)
    for i in range(num_reqs):
        batch.add(RequestState(f"warm-up-{i}", 2, [0, 1], params, [i], 0, seed=i,
                               needs_prompt_logprobs=False))
    inputs = batch.prepare(np.full(num_reqs, 2))
    dtype, width = layout
    logits = torch.zeros(num_reqs, width, dtype=dtype, device=runner.device)
    runner.sampler(logits[:, :runner.vocab_size],
                   batch.sampling_metadata(inputs, runner.eos_token_id))


def _warm_up_token_bitmask(runner: ModelRunner) -> None:
    # The first structured-output request must not pay the kernel's build (nor its step).
    from kernels.token_bitmask import apply_token_bitmask

    logits = torch.zeros(2, runner.vocab_size, dtype=torch.float32, device=runner.device)
    bitmask = torch.full((1, -(-runner.vocab_size // 32)), -1, dtype=torch.int32,
                         device=runner.device)
    apply_token_bitmask(logits, bitmask, torch.ones(1, dtype=torch.int64, device=runner.device))
