"""CUDA graphs for decode steps over a ladder of batch sizes (padded).

Each graph replays the whole model forward for ``size`` one-token requests from static
buffers. A step with fewer requests is padded to the next size: padding rows get
``seq_len = 0`` (the decode kernel writes zeros for them) and slot ``-1`` (no KV write).
Prefill and mixed steps run eagerly. Kernels are compiled by a warm-up run before each
capture, so no autotuning or JIT compilation happens inside capture.
"""

from __future__ import annotations

import logging
import time

import torch

from worker_svc.input_batch import BatchInputs
from worker_svc.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to ``max_batch_size`` (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphRunner:
    """Captures and replays decode forwards.

    Args:
        model: the loaded model (``forward(input_ids, positions, kv_caches, metadata)``).
        kv_caches: the runner's per-layer caches (captured by address: never reallocate).
        max_batch_size: largest decode batch to capture.
        max_blocks_per_seq: width of the static block table (max_model_len / block_size).
        max_seq_len: passed as ``max_seq_len`` at capture (sizes launch grids for the
            longest context).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list, max_batch_size: int,
                 max_blocks_per_seq: int, max_seq_len: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = batch_size_ladder(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1],
                                 self.seq_lens[:size], self.block_tables[:size],
                                 max_query_len=1, max_seq_len=self.max_seq_len)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches,
                          self._metadata(size))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles the Triton kernels for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d) in %.1f s",
                    len(self.graphs), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - start)

    def can_run(self, batch: BatchInputs) -> bool:
        meta = batch.attn_metadata
        return (meta.is_decode_only and meta.num_reqs <= self.max_batch_size
                and meta.block_tables.shape[1] <= self.max_blocks_per_seq
                and batch.input_ids.shape[0] == meta.num_reqs)

    def run(self, batch: BatchInputs) -> torch.Tensor:
        """Hidden states ``[num_reqs, hidden]`` of a decode batch, by graph replay."""
        meta = batch.attn_metadata
        num_reqs = meta.num_reqs
        size = next(s for s in self.sizes if s >= num_reqs)
        width = meta.block_tables.shape[1]
        self.input_ids[:num_reqs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:num_reqs].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:num_reqs].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[num_reqs:size].fill_(-1)
        self.seq_lens[:num_reqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[num_reqs:size].zero_()
        self.block_tables[:num_reqs, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:num_reqs]
