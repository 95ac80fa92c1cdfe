"""CUDA graphs for decode steps over a ladder of batch sizes (padded) and context classes.

Each graph replays the whole model forward for ``size`` one-token requests from static
buffers. A step with fewer requests is padded to the next size: padding rows get
``seq_len = 0`` (the decode kernel writes zeros for them) and slot ``-1`` (no KV write).
Per size there is one graph per split-KV count the decode kernel picks for some context
length (``pick_num_splits``): a short context replays a graph without the split-KV reduce
pass. Prefill and mixed steps run eagerly. Kernels are compiled by a warm-up run before
each capture, so no autotuning or JIT compilation happens inside capture.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from kernels import torch_ref
from kernels.paged_decode_attention import pick_num_splits
from kernels.step_inputs import decode_graph_inputs
from worker_svc.input_batch import BatchInputs
from worker_svc.layers import ops
from worker_svc.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to ``max_batch_size`` (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def context_classes(size: int, num_kv_heads: int, max_seq_len: int,
                    device: torch.device, one_warp: bool = False) -> dict[int, int]:
    """Split count -> the shortest context (a power of two, or ``max_seq_len``) for which
    the decode kernel picks it at batch ``size``; covers every count up to ``max_seq_len``.
    ``one_warp``: the decode kernel is the Gluon kernel over an FP8 cache
    (``pick_num_splits``)."""
    classes: dict[int, int] = {}
    context = 1
    while True:
        context = min(context, max_seq_len)
        classes.setdefault(pick_num_splits(size, num_kv_heads, context, device, one_warp),
                           context)
        if context == max_seq_len:
            return classes
        context *= 2


class CudaGraphRunner:
    """Captures and replays decode forwards.

    Args:
        model: the loaded model (``forward(input_ids, positions, kv_caches, metadata)``).
        kv_caches: the runner's per-layer caches (captured by address: never reallocate).
        max_batch_size: largest decode batch to capture.
        max_blocks_per_seq: width of the static block table (max_model_len / block_size).
        max_seq_len: longest context a replay may see.
        device: the GPU.
        num_kv_heads: the model's KV heads (the decode kernel's split count depends on it).
        num_groups: KV groups (each has its own static slot mapping and block table).
        one_warp_splits: decode attention runs the Gluon kernel over an FP8 cache, which
            picks its split count for one-warp programs (``pick_num_splits``).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list, max_batch_size: int,
                 max_blocks_per_seq: int, max_seq_len: int, device: torch.device,
                 num_kv_heads: int, num_groups: int = 1, one_warp_splits: bool = False):
        self.model = model
        self.kv_caches = kv_caches
        self.one_warp_splits = one_warp_splits
        self.sizes = batch_size_ladder(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        self.device = device
        self.num_kv_heads = num_kv_heads
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        # The dtypes of the eager path's inputs (one kernel variant for both).
        self.positions = torch.zeros(n, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self._static = {"input_ids": self.input_ids, "positions": self.positions,
                        "slot_mapping": self.slot_mapping, "seq_lens": self.seq_lens,
                        "block_tables": self.block_tables}
        # The same for the KV groups after the first.
        self.group_slot_mapping = torch.full((num_groups - 1, n), -1, dtype=torch.long,
                                             device=device)
        self.group_block_tables = torch.zeros(num_groups - 1, n, max_blocks_per_seq,
                                              dtype=torch.int32, device=device)
        # (batch size, split count) -> graph and its output buffer.
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _metadata(self, size: int, max_seq_len: int) -> AttentionMetadata:
        metadata = AttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1],
                                     self.seq_lens[:size], self.block_tables[:size],
                                     max_query_len=1, max_seq_len=max_seq_len)
        if len(self.group_block_tables):
            metadata.groups = [metadata] + [
                dataclasses.replace(metadata, slot_mapping=slots[:size],
                                    block_tables=tables[:size])
                for slots, tables in zip(self.group_slot_mapping, self.group_block_tables,
                                         strict=True)]
        return metadata

    def _forward(self, size: int, max_seq_len: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches,
                          self._metadata(size, max_seq_len))

    def _classes(self, size: int) -> dict[int, int]:
        return context_classes(size, self.num_kv_heads, self.max_seq_len, self.device,
                               self.one_warp_splits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (size, split count), largest first, sharing one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            for num_splits, context in sorted(self._classes(size).items(), reverse=True):
                self._forward(size, context)  # warm-up: compiles this shape's kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[size, num_splits] = self._forward(size, context)
                self.graphs[size, num_splits] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d, split-KV classes) "
                    "in %.1f s", len(self.graphs), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - start)

    def can_run(self, batch: BatchInputs) -> bool:
        meta = batch.attn_metadata
        return (meta.is_decode_only and meta.num_reqs <= self.max_batch_size
                and meta.block_tables.shape[1] <= self.max_blocks_per_seq
                and meta.max_seq_len <= self.max_seq_len
                and batch.input_ids.shape[0] == meta.num_reqs)

    def graph_key(self, num_reqs: int, max_seq_len: int) -> tuple[int, int]:
        """The (padded size, split count) graph a decode batch replays."""
        size = next(s for s in self.sizes if s >= num_reqs)
        num_splits = pick_num_splits(size, self.num_kv_heads, max_seq_len, self.device,
                                     self.one_warp_splits)
        if (size, num_splits) not in self.graphs:
            # Any split count is correct; take the largest captured one below.
            num_splits = max(s for (z, s) in self.graphs if z == size and s <= num_splits)
        return size, num_splits

    def run(self, batch: BatchInputs) -> torch.Tensor:
        """Hidden states ``[num_reqs, hidden]`` of a decode batch, by graph replay."""
        meta = batch.attn_metadata
        num_reqs = meta.num_reqs
        key = self.graph_key(num_reqs, meta.max_seq_len)
        size = key[0]
        width = meta.block_tables.shape[1]
        inputs = {"input_ids": batch.input_ids, "positions": batch.positions,
                  "slot_mapping": meta.slot_mapping, "seq_lens": meta.seq_lens,
                  "block_tables": meta.block_tables}
        if ops.uses_triton(batch.input_ids):  # one launch for the torch reference's copies
            decode_graph_inputs(inputs, self._static, size)
        else:
            torch_ref.decode_graph_inputs(inputs, self._static, size)
        for group, view in enumerate((meta.groups or [])[1:]):
            self.group_slot_mapping[group, :num_reqs].copy_(view.slot_mapping,
                                                            non_blocking=True)
            self.group_slot_mapping[group, num_reqs:size].fill_(-1)
            self.group_block_tables[group, :num_reqs, :width].copy_(view.block_tables,
                                                                   non_blocking=True)
        self.graphs[key].replay()
        return self.outputs[key][:num_reqs]
