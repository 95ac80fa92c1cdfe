"""The model runner: holds weights, the paged KV cache and per-request state; turns a
``SchedulerOutput`` into one forward pass plus sampling (a ``ModelRunnerOutput``)."""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.contract import ModelLimits, ModelRunnerOutput, SchedulerOutput
from gridllm.common.tokenizer import TOKENIZER_FILES, load_tokenizer
from kernels import fp8_decode_attention as gluon_fp8
from worker_svc import piecewise_graph
from worker_svc.cuda_graph import CudaGraphRunner
from worker_svc.input_batch import BatchInputs, InputBatch
from worker_svc.kv_calibration import calculate_kv_scales
from worker_svc.kv_groups import model_kv_groups
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.ops import set_use_triton
from worker_svc.layers.quantization import kv_cache_torch_dtype
from worker_svc.layers.selector import get_attention_backend
from worker_svc.loader import load_model
from worker_svc.logits_processors import verify_logits_processors
from worker_svc.logprobs import LogprobsTensors
from worker_svc.parallel.state import state_for
from worker_svc.piecewise_graph import PiecewiseGraphRunner
from worker_svc.request_state import RequestState
from worker_svc.runner_output import AsyncRunnerOutput
from worker_svc.sampler import Sampler
from worker_svc.structured_output import StructuredOutputManager
from worker_svc.torch_utils import memory_usage, resolve_device, resolve_dtype
from worker_svc.warmup import warm_up_kernels, warm_up_steps

logger = logging.getLogger(__name__)

# Rows of prompt-logprob logits materialised at once ([rows, vocab] float32).
_PROMPT_LOGPROB_CHUNK = 256


def kv_cache_geometry(hf_config, tensor_parallel_size: int = 1) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of the model's attention (KV heads: those
    of one rank; one, replicated, when there are fewer than ranks)."""
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    num_kv_heads = max(num_kv_heads // tensor_parallel_size, 1)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return hf_config.num_hidden_layers, num_kv_heads, head_dim


class ModelRunner:
    """Args:
        model_config: which model, dtype, device, attention backend.
        cache_config: block size and how many KV blocks (or how much memory for them).
        scheduler_config: batch limits (sizes the profiling forward on CUDA).
        eos_token_id: EOS id the sampler holds back until ``min_tokens``; default: the
            model config's (first) ``eos_token_id``.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, eos_token_id: int | None = None):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        if model_config.seed is not None:
            torch.manual_seed(model_config.seed)
        self.attn_backend = get_attention_backend(model_config.attention_backend, self.device,
                                                  model_config.sparse_attention)
        set_use_triton(self.attn_backend.name == "triton")
        self.kv_cache_dtype = kv_cache_torch_dtype(cache_config.kv_cache_dtype, self.dtype,
                                                   self.device, self.attn_backend.name)
        self.model, self.hf_config = load_model(model_config, self.attn_backend, self.device)
        logger.info("memory after loading weights: %s", memory_usage(self.device))
        self.vocab_size = self.hf_config.vocab_size
        # Layers grouped by attention pattern; several groups: a hybrid KV layout.
        self.kv_groups = model_kv_groups(self.model, self.hf_config.num_hidden_layers)
        if self.kv_groups.num_groups > 1:
            logger.info("hybrid KV layout: %d KV groups of %d layers, windows %s; a block "
                        "id holds %d layers of KV; prefix-cache hits need each local "
                        "group's window cached", self.kv_groups.num_groups,
                        self.kv_groups.num_slots, list(self.kv_groups.windows),
                        self.kv_groups.num_slots)
        self.max_model_len = self._resolve_max_model_len()
        self.block_size = cache_config.block_size
        if cache_config.calculate_kv_scales:
            calculate_kv_scales(self, None if model_config.skip_tokenizer_init
                                else tokenizer_loader(model_config))
        self.eos_token_id = eos_token_id if eos_token_id is not None else _first_eos(self.hf_config)
        # The references on CUDA too when attention_backend="torch" (a kernel-free run).
        self.sampler = Sampler(seed=model_config.seed,
                               use_kernel=False if self.attn_backend.name == "torch" else None)
        self.requests: dict[str, RequestState] = {}
        self.input_batch = InputBatch(scheduler_config.max_num_seqs, self.max_model_len,
                                      self.block_size, self.vocab_size, self.device,
                                      self.kv_groups.num_groups)
        # Step outputs not read yet, oldest first (at most two: see execute_model_async).
        self._unread: collections.deque[AsyncRunnerOutput] = collections.deque()
        # Requests refused (bad processor arguments, a grammar that does not compile) until
        # the scheduler drops them.
        self._refused: set[str] = set()
        # Grammars of the requests with structured_outputs (compiled on a background thread).
        self.structured_outputs = StructuredOutputManager(
            tokenizer_loader(model_config), self.vocab_size, self.device)
        # Tensor-parallel ranks all hold as many blocks as the smallest one can.
        self.num_kv_blocks = state_for(model_config.tensor_parallel_size).min_int(
            self._num_kv_blocks(), self.device)
        self.kv_caches = self._allocate_kv_cache(self.num_kv_blocks)
        logger.info("KV cache: %d blocks of %d tokens; memory after allocating it: %s",
                    self.num_kv_blocks, self.block_size, memory_usage(self.device))
        self._warm_up()
        self.graph_runner = self._capture_cuda_graphs()
        self.piecewise_runner = self._capture_piecewise_graphs()
        self._warm_up(steps=True)

    def _warm_up(self, steps: bool = False) -> None:
        """Build the serving path's Triton variants (then, with ``steps``, run real steps
        through it) before serving: see worker_svc/warmup.py."""
        if self.device.type != "cuda" or self.attn_backend.name != "triton":
            return
        if steps:
            warm_up_steps(self)
        else:
            warm_up_kernels(self)

    def dummy_forward(self, num_tokens: int, kv_caches: list, width: int | None = None,
                      seq_len: int | None = None, logits_rows: int = 1,
                      token_ids: torch.Tensor | None = None) -> None:
        """A forward of one request of ``seq_len`` tokens (default ``num_tokens``) whose
        last ``num_tokens`` are computed (``token_ids``, default zeros), with a block table
        ``width`` blocks wide, through the logits of its last ``logits_rows`` tokens (before
        any real request: it writes KV)."""
        dev = self.device
        seq_len = seq_len or num_tokens
        num_blocks = -(-seq_len // self.block_size)
        width = width or num_blocks
        table = torch.arange(width, dtype=torch.int32, device=dev) % len(kv_caches[0][0])
        positions = torch.arange(seq_len - num_tokens, seq_len, dtype=torch.int32, device=dev)
        metadata = AttentionMetadata(
            slot_mapping=(table[positions.long() // self.block_size].long() * self.block_size
                          + positions % self.block_size),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev),
            block_tables=table[None], max_query_len=num_tokens, max_seq_len=seq_len)
        if token_ids is None:
            token_ids = torch.zeros(num_tokens, dtype=torch.int32, device=dev)
        hidden = self.model(token_ids, positions, kv_caches, metadata)
        self.model.compute_logits(hidden[-logits_rows:], float32=False)

    def _capture_cuda_graphs(self) -> CudaGraphRunner | None:
        # Graphs need host-sync-free kernels: the Triton backend's decode path is.
        if (self.device.type != "cuda" or self.model_config.enforce_eager
                or self.attn_backend.name != "triton"):
            return None
        _, num_kv_heads, _ = self.kv_geometry()
        graph_runner = CudaGraphRunner(
            self.model, self.kv_caches, min(self.scheduler_config.max_num_seqs, 256),
            -(-self.max_model_len // self.block_size), self.max_model_len, self.device,
            num_kv_heads=num_kv_heads, num_groups=self.kv_groups.num_groups,
            one_warp_splits=self.one_warp_decode())
        graph_runner.capture()
        return graph_runner

    def one_warp_decode(self) -> bool:
        """Whether decode attention runs the one-warp Gluon kernel over this model's FP8
        cache, whose split counts follow their own rule (``pick_num_splits(one_warp=True)``)."""
        _, num_kv_heads, head_dim = self.kv_geometry()
        num_heads = max(self.hf_config.num_attention_heads
                        // self.model_config.tensor_parallel_size, 1)
        return gluon_fp8.serves_layout(self.kv_cache_dtype, self.dtype, head_dim,
                                       num_heads // num_kv_heads, self.device)

    def _capture_piecewise_graphs(self) -> PiecewiseGraphRunner | None:
        # Prefill and mixed steps: graphs between attention calls (one device, so no
        # collective sits between a rank's graphs and another's eager attention).
        if (self.graph_runner is None or not piecewise_graph.ENABLED
                or self.model_config.tensor_parallel_size > 1):
            return None
        limit = min(self.scheduler_config.max_num_batched_tokens, self.max_model_len - 1,
                    piecewise_graph.DEFAULT_MAX_TOKENS)
        if not piecewise_graph.token_ladder(limit):
            return None
        runner = PiecewiseGraphRunner(self.model, self.attn_backend, self.kv_caches, limit,
                                      self.device, self.kv_groups.num_groups)
        runner.capture(lambda size: self.dummy_forward(size, self.kv_caches))
        logger.info("memory after capturing the graphs cut at attention: %s",
                    memory_usage(self.device))
        return runner

    @property
    def limits(self) -> ModelLimits:
        """What this runner serves, resolved from the model and the configs."""
        groups = self.kv_groups
        return ModelLimits(max_model_len=self.max_model_len, vocab_size=self.vocab_size,
                           block_size=self.block_size, eos_token_id=self.eos_token_id,
                           kv_window=groups.windows[0] if groups.num_groups == 1 else None,
                           kv_group_windows=groups.limits_windows)

    # ---- setup -------------------------------------------------------------------------
    def _resolve_max_model_len(self) -> int:
        model_limit = getattr(self.hf_config, "max_position_embeddings", None)
        requested = self.model_config.max_model_len
        if requested is None:
            if model_limit is None:
                raise ValueError("max_model_len must be set: the model config has no "
                                 "max_position_embeddings.")
            return int(model_limit)
        if model_limit is not None and requested > model_limit:
            raise ValueError(f"max_model_len must be at most the model's "
                             f"max_position_embeddings={model_limit}, got {requested}.")
        return requested

    def kv_geometry(self) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)`` of this rank's KV cache."""
        return kv_cache_geometry(self.hf_config, self.model_config.tensor_parallel_size)

    def bytes_per_block(self) -> int:
        """Bytes of one block id: the KV of one group's layers (all layers with one group)."""
        _, num_kv_heads, head_dim = self.kv_geometry()
        element = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        return (2 * self.kv_groups.num_slots * self.block_size * num_kv_heads * head_dim
                * element)

    def _num_kv_blocks(self) -> int:
        if self.cache_config.num_kv_blocks is not None:
            # Blocks of every layer: a hybrid layout's ids hold fewer layers each, so
            # the same memory holds more of them.
            num_layers = self.kv_geometry()[0]
            return self.cache_config.num_kv_blocks * num_layers // self.kv_groups.num_slots
        if self.device.type != "cuda":
            num = self.cache_config.kv_cache_memory // self.bytes_per_block()
        else:
            num = self._profile_cuda_blocks()
        if num < 1:
            raise ValueError("kv_cache_memory (or gpu_memory_utilization) leaves no room for "
                             f"a single KV block of {self.bytes_per_block()} bytes.")
        return int(num)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key_cache, value_cache)``; with several KV groups, layers of
        different groups share tensors (see worker_svc/kv_groups.py)."""
        _, num_kv_heads, head_dim = self.kv_geometry()
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        dtype = self.kv_cache_dtype
        slots = [(_zeros(shape, dtype, self.device), _zeros(shape, dtype, self.device))
                 for _ in range(self.kv_groups.num_slots)]
        return [slots[slot] for slot in self.kv_groups.layer_slots]

    @torch.inference_mode()
    def _profile_cuda_blocks(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the GPU after a forward of the
        largest step (the activation peak) on top of the weights."""
        num_tokens = min(self.scheduler_config.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        caches = self._allocate_kv_cache(num_blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        self.dummy_forward(num_tokens, caches)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = self.cache_config.gpu_memory_utilization * total - (total - free) - activation_peak
        logger.info("profiling: activation peak %.1f MiB, KV budget %.1f MiB",
                    activation_peak / 2**20, budget / 2**20)
        return int(budget // self.bytes_per_block())

    # ---- one step ----------------------------------------------------------------------
    def reset_requests(self) -> None:
        """Forget every request (a new scheduler took over); the KV cache stays. Outputs
        not read yet stay readable but no longer touch the runner's state."""
        self._unread.clear()
        self.requests.clear()
        self._refused.clear()
        self.input_batch.clear()

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its output (``execute_model_async(...).get_output()``)."""
        return self.execute_model_async(scheduler_output).get_output()

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> AsyncRunnerOutput:
        """Queue one step on the device; returns before its sampled ids reach the host.

        A request whose sampled token's id is still on the device (the previous step's
        output not read yet) gets it as its next input there. Outputs of steps before the
        previous one are read here first.

        Args:
            scheduler_output: new requests in full, cached ones as diffs, tokens per request.
        Returns:
            The step's output: sampled token ids of the requests whose chunk reached the end
            of their tokens, plus logprobs / prompt logprobs where asked for.
        """
        self._unread = collections.deque(o for o in self._unread if not o.is_read)
        while len(self._unread) > 1:
            self._unread.popleft().get_output()
        output = ModelRunnerOutput()
        self._update_states(scheduler_output, output)
        batch = self.input_batch
        if batch.num_reqs == 0:
            return AsyncRunnerOutput(output)
        num_scheduled = np.fromiter(
            (scheduler_output.num_scheduled_tokens[r] for r in batch.req_ids),
            dtype=np.int64, count=batch.num_reqs)
        num_scheduled = batch.put_one_query_first(num_scheduled)
        inputs = batch.prepare(num_scheduled)
        if self.graph_runner is not None and self.graph_runner.can_run(inputs):
            hidden = self.graph_runner.run(inputs)
        elif self.piecewise_runner is not None and self.piecewise_runner.can_run(inputs):
            hidden = self.piecewise_runner.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches,
                                inputs.attn_metadata)
        prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        # A step of one token a row samples every row: no gather (a launch saved). The
        # logits stay in the LM head's dtype: the argmax and sampling kernels read them as
        # they are, and the sampler copies them to float32 where it masks them or reports
        # logprobs.
        every_row = hidden.shape[0] == len(inputs.num_tokens) == inputs.input_ids.shape[0]
        logits = self.model.compute_logits(
            hidden if every_row else hidden[inputs.logits_indices], float32=False)
        constrained = batch.constrained_rows(inputs)
        if batch.processor_rows_have_pending_tokens():
            # Extra processors read the token ids on the host: wait for the previous step's
            # ids (its copy only; this step's forward keeps the device busy meanwhile). A
            # grammar's mask needs them too, but the structured outputs' own thread takes
            # them as they land (prepare waits for it).
            for pending in self._unread:
                pending.get_output()
        meta = batch.sampling_metadata(inputs, self.eos_token_id)
        grammar_failures: dict[int, str] = {}
        if constrained:
            meta.token_bitmask, meta.bitmask_rows, grammar_failures = \
                self.structured_outputs.prepare(
                    [batch.states[r].grammar for r in constrained], constrained)
        sampled = self.sampler(logits, meta)
        batch.record_samples(sampled.token_ids, inputs)
        states = batch.states.copy()
        for row, error in grammar_failures.items():
            self._refuse(states[row].req_id, error, output)
        sample_rows = np.flatnonzero(inputs.is_sampling).tolist()
        token_ids = _to_host(sampled.token_ids)
        logprobs = (sampled.logprobs_tensors.to_host()
                    if sampled.logprobs_tensors is not None else None)
        prompt_logprobs = [(req_id, t.to_host(), n) for req_id, t, n in prompt_logprobs]
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        # The masked rows' grammars take their tokens as soon as they land.
        advance = self.structured_outputs.advance(token_ids, event) if constrained else None

        def finalize(out: ModelRunnerOutput) -> None:
            ids = token_ids.tolist()
            live_rows = set()
            live_states, live_ids = [], []
            requests = self.requests
            for row in sample_rows:
                state = states[row]
                req_id = state.req_id
                token_id = ids[row]
                if requests.get(req_id) is state:  # not dropped meanwhile
                    live_states.append(state)
                    live_ids.append(token_id)
                    live_rows.add(row)
                out.req_ids.append(req_id)
                out.sampled_token_ids[req_id] = [token_id]
            batch.append_known_tokens(live_states, live_ids)
            if logprobs is not None:
                assert sampled.logprobs_rows is not None
                rows = sampled.logprobs_rows
                entries = logprobs.to_lists([sampled.num_logprobs[r] or 0  # type: ignore[index]
                                             for r in rows])
                for row, entry in zip(rows, entries, strict=True):
                    if inputs.is_sampling[row]:
                        out.logprobs[states[row].req_id] = [entry]
            for req_id, tensors, num_top in prompt_logprobs:
                out.prompt_logprobs[req_id] = tensors.to_lists([num_top] * len(tensors.ranks))
            # Last: the grammar thread has been accepting the tokens meanwhile.
            for row, error in self.structured_outputs.errors(advance).items():
                if row in live_rows:
                    out.failed[states[row].req_id] = error  # the scheduler drops it

        pending = AsyncRunnerOutput(output, finalize, event)
        self._unread.append(pending)
        return pending

    def _update_states(self, scheduler_output: SchedulerOutput,
                       output: ModelRunnerOutput) -> None:
        batch = self.input_batch
        # Sorted: the rows' order must not depend on the process's string hashing (every
        # tensor-parallel rank builds the same batch).
        for req_id in sorted(scheduler_output.finished_req_ids):
            self.requests.pop(req_id, None)
            self._refused.discard(req_id)
            if req_id in batch.rows:
                batch.remove(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            try:
                verify_logits_processors(new.sampling_params)
            except ValueError as exc:
                # One request's bad arguments must not fail the step for the others.
                output.failed[new.req_id] = str(exc)
                self._refused.add(new.req_id)
                continue
            state = RequestState.from_new(new, self.sampler.request_seed(new.sampling_params))
            if new.sampling_params.structured_outputs is not None:
                # Compiles meanwhile; a rebuilt request's tokens replay into a fresh matcher.
                state.grammar = self.structured_outputs.new_request(
                    new.sampling_params, self.eos_token_id, new.output_token_ids)
                error = state.grammar.error() if state.grammar.is_ready else None
                if error is not None:
                    output.failed[new.req_id] = error
                    self._refused.add(new.req_id)
                    continue
            self.requests[new.req_id] = state
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id in [r for r in batch.req_ids if not scheduled.get(r)]:
            batch.remove(req_id)  # kept in self.requests: it is back in a later step
        for cached in scheduler_output.scheduled_cached_reqs:
            if cached.req_id in self._refused:
                continue  # scheduled again before the scheduler learnt of the refusal
            state = self.requests.get(cached.req_id)
            if state is None:
                raise ValueError(f"request {cached.req_id!r} is not known to the runner; "
                                 "send it as a new request.")
            if cached.req_id in batch.rows:
                batch.update_cached(cached.req_id, cached.new_block_ids,
                                    cached.num_computed_tokens, cached.new_group_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
                for ids, new_ids in zip(state.group_block_ids, cached.new_group_block_ids,
                                        strict=True):
                    ids.extend(new_ids)
                state.num_computed_tokens = cached.num_computed_tokens
        for req_id, num_tokens in scheduled.items():
            if num_tokens > 0 and req_id not in batch.rows and req_id in self.requests:
                batch.add(self.requests[req_id])

    def _refuse(self, req_id: str, error: str, output: ModelRunnerOutput) -> None:
        """Fail one request of a step already sampled (its grammar did not compile)."""
        output.failed[req_id] = error
        self._refused.add(req_id)
        self.requests.pop(req_id, None)
        if req_id in self.input_batch.rows:
            self.input_batch.remove(req_id)

    def _prompt_logprobs(self, inputs: BatchInputs, hidden: torch.Tensor
                         ) -> list[tuple[str, LogprobsTensors, int]]:
        """Row at position p scores prompt token p + 1; positions are this step's chunk."""
        results = []
        batch = self.input_batch
        first_rows = np.cumsum(inputs.num_tokens) - inputs.num_tokens
        for row in np.flatnonzero(batch.needs_prompt_logprobs[:batch.num_reqs]).tolist():
            state = batch.states[row]
            start, n = int(inputs.starts[row]), int(inputs.num_tokens[row])
            first_row = int(first_rows[row])
            # Positions start..start+n-1 predicting prompt tokens start+1..min(end, prompt_len-1).
            count = min(start + n, state.num_prompt_tokens - 1) - start
            if count <= 0:
                continue
            num_top = state.sampling_params.prompt_logprobs or 0
            targets = torch.tensor(state.token_ids[start + 1:start + 1 + count],
                                   dtype=torch.long).to(self.device)
            parts = []
            for offset in range(0, count, _PROMPT_LOGPROB_CHUNK):
                size = min(_PROMPT_LOGPROB_CHUNK, count - offset)
                logits = self.model.compute_logits(
                    hidden[first_row + offset:first_row + offset + size])
                parts.append(LogprobsTensors.compute(torch.log_softmax(logits, dim=-1),
                                                     targets[offset:offset + size], num_top))
            results.append((state.req_id, LogprobsTensors(
                *(torch.cat([getattr(p, f) for p in parts]) for f in
                  ("token_ids", "logprobs", "ranks"))), num_top))
        return results


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy queued behind the step's kernels (pinned: it does not block)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def tokenizer_loader(model_config: ModelConfig) -> Callable[[], Any] | None:
    """What loads the model's tokenizer for the grammar compiler: from ``tokenizer`` (a
    directory or preset), else the model's directory or GGUF file; None where there is none
    (random weights without ``tokenizer``, a directory without tokenizer files)."""
    from worker_svc.loader import resolve_model_path

    path = resolve_model_path(model_config.tokenizer or model_config.model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        directory, filename = os.path.split(path)

        def load_gguf_tokenizer() -> Any:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        return load_gguf_tokenizer
    if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                        for f in TOKENIZER_FILES)):
        return None
    return lambda: load_tokenizer(path)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # numpy's zeros is calloc: the OS hands out zero pages lazily, so a large CPU pool costs
    # nothing until used (torch.zeros would touch every page up front).
    num_bytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


def _first_eos(hf_config) -> int | None:
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        return eos[0] if eos else None
    return eos
