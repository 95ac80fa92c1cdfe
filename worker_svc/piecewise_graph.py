"""CUDA graphs for prefill and mixed steps, cut at each attention call ("piecewise").

A step that is not a decode batch the decode graphs cover runs eagerly, and its host time
is about the same at any token count: on an H100, Llama-3-8B's eager forward takes ~25 ms
of launches (Triton's launch path, cuBLAS, modules), while the GPU needs ~12 ms for 512
tokens, so such steps ran at the host's pace. Here everything between two attention calls
(norms, projections, activations, residuals) is captured once per token count of a ladder
(``token_ladder``); attention, whose inputs (lengths, block tables, the split of one-query
requests) change every step, runs eagerly between the graphs:

    replay graph 0; attention of layer 0; replay graph 1; ...; replay graph L

A step of ``T`` tokens replays the smallest captured size ``>= T``: rows past ``T`` get
token 0 at position 0 and whatever attention output an earlier step left there, and no
result of theirs is read (attention runs on the first ``T`` rows only; every other op is
per row, FP8 activations included: they are scaled per token).

During capture the attention backend writes the layer's keys and values to the cache
inside the graph (rotary fused where the model rotates there), at the step's slots, which
the runner copies into a static buffer per KV group before the first graph (-1 past the
step's tokens: nothing written). It then hands the attention call to ``Capture.cut``: the
queries are copied (inside the graph) into a buffer shared by every layer and size, the
graph ends, and the call is recorded as a closure over what does not change (caches,
scales, the layer's window), to run at replay on the shared buffer and the step's
metadata (its KV group's view). The attention writes its output into one shared buffer
(``out=``), which the next graph reads. The copy costs a read and a write of the queries a
layer; sharing the buffers keeps the graphs' memory at about one eager step's
activations. Between two graphs the host launches the attention kernels only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from kernels._utils import env_int, env_switch
from worker_svc.input_batch import BatchInputs
from worker_svc.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


# GRIDLLM_PIECEWISE_GRAPHS=0 before start keeps prefill and mixed steps eager.
ENABLED = env_switch("GRIDLLM_PIECEWISE_GRAPHS")
# The largest step captured, in tokens (capped by max_num_batched_tokens; below 16,
# none): past it the GPU's time for a step outgrows the host's launches (Llama-3-8B on an
# H100: ~1,000 tokens).
DEFAULT_MAX_TOKENS = env_int("GRIDLLM_PIECEWISE_MAX_TOKENS", 2048)

# (step between sizes, up to): every 16 tokens up to 256, 32 up to 512, 64 up to 1,024,
# 128 beyond, so a step past 128 tokens pads by at most an eighth (below, by < 16).
_LADDER = ((16, 256), (32, 512), (64, 1024), (128, None))

# Attend(query, metadata, out, check): the recorded call, writing into ``out`` (the cache
# holds the step's keys and values by then); ``check``: validate the arguments (a step's
# first call of each KV group does; the others differ only in their layer's caches).
Attend = Callable[[torch.Tensor, AttentionMetadata, torch.Tensor, bool], torch.Tensor]


def token_ladder(max_tokens: int) -> list[int]:
    """The token counts captured for steps of up to ``max_tokens`` tokens: ``_LADDER``'s
    sizes up to ``max_tokens``, and ``max_tokens`` rounded down to a multiple of 16 (none
    below 16)."""
    sizes: list[int] = []
    size = 0
    for step, upto in _LADDER:
        while size + step <= max_tokens and (upto is None or size + step <= upto):
            size += step
            sizes.append(size)
    last = max_tokens // 16 * 16
    if last >= 16 and (not sizes or sizes[-1] < last):
        sizes.append(last)
    return sizes


@dataclasses.dataclass
class _Call:
    """One attention call between two graphs."""

    attend: Attend
    group: int | None  # the KV group's metadata view (None: the step's metadata)
    query: torch.Tensor  # the shared buffers, full length
    out: torch.Tensor


@dataclasses.dataclass
class _Pieces:
    graphs: list[torch.cuda.CUDAGraph]
    calls: list[_Call]


class Capture:
    """Receives the attention backend's calls while one forward is captured (the
    backend's ``piecewise`` attribute): ends the current graph at each, records it, and
    begins the next."""

    def __init__(self, owner: PiecewiseGraphRunner, size: int, pool, metadata: AttentionMetadata):
        self.owner = owner
        self.size = size
        self.pool = pool
        self.metadata = metadata
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[_Call] = []
        self._open = False

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)
        self._open = True

    def end(self) -> None:
        self._open = False
        self.graphs[-1].capture_end()

    def abort(self) -> None:
        """End a capture left open by an exception (its graphs are dropped)."""
        if self._open:
            try:
                self.end()
            except RuntimeError:
                pass

    def slot_mapping(self, metadata: AttentionMetadata) -> torch.Tensor:
        """The slots the captured cache writes of ``metadata``'s KV group use: the static
        buffer ``PiecewiseGraphRunner.run`` fills with the step's before each replay."""
        return self.owner.slot_mappings[self._group_of(metadata) or 0][:self.size]

    def cut(self, attend: Attend, query: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """An attention call of the captured forward (the step's keys and values already
        written to the cache inside the graph): returns the buffer its output will be in,
        for the next graph to read."""
        n = self.size
        buffer = self.owner.buffer("query", query)
        buffer[:n].copy_(query)
        out = self.owner.buffer("out", query)
        self.end()
        self.calls.append(_Call(attend, self._group_of(metadata), buffer, out))
        self.begin()
        return out[:n]

    def _group_of(self, metadata: AttentionMetadata) -> int | None:
        if self.metadata.groups is None:
            return None
        return next(i for i, view in enumerate(self.metadata.groups) if view is metadata)


class PiecewiseGraphRunner:
    """Captures and replays prefill and mixed forwards cut at attention.

    Args:
        model: the loaded model (``forward(input_ids, positions, kv_caches, metadata)``).
        backend: the model's attention backend (has a ``piecewise`` attribute).
        kv_caches: the runner's per-layer caches.
        max_tokens: the largest step to capture.
        device: the GPU.
        num_groups: KV groups (the capture's metadata has a view per group).
    """

    def __init__(self, model: torch.nn.Module, backend, kv_caches: list, max_tokens: int,
                 device: torch.device, num_groups: int = 1):
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.sizes = token_ladder(max_tokens)
        if not self.sizes:
            raise ValueError(f"max_tokens must be at least 16, got {max_tokens}.")
        self.max_tokens = self.sizes[-1]
        self.device = device
        self.num_groups = num_groups
        n = self.max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.int32, device=device)
        # Per KV group, the step's slots (-1: no write), read by the captured cache writes.
        self.slot_mappings = [torch.full((n,), -1, dtype=torch.long, device=device)
                              for _ in range(num_groups)]
        self.output: torch.Tensor | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.pieces: dict[int, _Pieces] = {}
        self.num_replays = 0

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The shared buffer ``name`` for tensors shaped like ``like`` past dim 0, at the
        largest size (allocated in the graphs' pool during the first capture)."""
        key = (name, tuple(like.shape[1:]), like.dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty((self.max_tokens, *like.shape[1:]),
                                             dtype=like.dtype, device=self.device)
        return self._buffers[key]

    def _metadata(self, size: int) -> AttentionMetadata:
        # Never read by attention (cut there); the model only picks a layer's group view.
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.full((size,), -1, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor([0, size], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([size], dtype=torch.int32, device=dev),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
            max_query_len=size, max_seq_len=size)
        if self.num_groups > 1:
            metadata.groups = [metadata] + [dataclasses.replace(metadata)
                                            for _ in range(self.num_groups - 1)]
        return metadata

    @torch.inference_mode()
    def capture(self, warm_up: Callable[[int], None]) -> None:
        """Capture every size, largest first, sharing one memory pool; ``warm_up(size)``
        runs an eager forward of that size first (builds its kernels)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            warm_up(size)
            torch.cuda.synchronize(self.device)
            metadata = self._metadata(size)
            capture = Capture(self, size, pool, metadata)
            self.backend.piecewise = capture
            try:
                with torch.cuda.stream(stream):
                    capture.begin()
                    hidden = self.model(self.input_ids[:size], self.positions[:size],
                                        self.kv_caches, metadata)
                    if self.output is None:
                        self.output = torch.empty((self.max_tokens, *hidden.shape[1:]),
                                                  dtype=hidden.dtype, device=self.device)
                    self.output[:size].copy_(hidden)
                    del hidden
                    capture.end()
            except BaseException:
                capture.abort()
                raise
            finally:
                self.backend.piecewise = None
            self.pieces[size] = _Pieces(capture.graphs, capture.calls)
        torch.cuda.synchronize(self.device)
        for buffer in self._buffers.values():
            buffer.zero_()
        logger.info("captured %d CUDA graphs cut at attention (steps of %d..%d tokens, "
                    "%d sizes) in %.1f s", sum(len(p.graphs) for p in self.pieces.values()),
                    self.sizes[0], self.sizes[-1], len(self.sizes),
                    time.perf_counter() - start)

    def can_run(self, batch: BatchInputs) -> bool:
        return 0 < batch.input_ids.shape[0] <= self.max_tokens and bool(self.pieces)

    def run(self, batch: BatchInputs) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of a step, by graph replay with eager attention."""
        metadata = batch.attn_metadata
        n = batch.input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        pieces = self.pieces[size]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.input_ids[n:size].zero_()
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.positions[n:size].zero_()
        views = [metadata] if metadata.groups is None else metadata.groups
        for slots, view in zip(self.slot_mappings, views, strict=True):
            m = view.slot_mapping.shape[0]
            slots[:m].copy_(view.slot_mapping, non_blocking=True)
            slots[m:size].fill_(-1)
        pieces.graphs[0].replay()
        checked: set[int | None] = set()
        for call, graph in zip(pieces.calls, pieces.graphs[1:], strict=True):
            view = metadata if call.group is None else metadata.groups[call.group]
            call.attend(call.query[:n], view, call.out[:n], call.group not in checked)
            checked.add(call.group)
            graph.replay()
        self.num_replays += 1
        return self.output[:n]
