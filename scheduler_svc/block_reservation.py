"""Length-aware admission: keep KV room for what running requests are predicted to generate.

Without it the scheduler admits a request as soon as its prompt fits; under KV pressure the
running requests then outgrow the pool and some are preempted and recomputed. With it, a
request is admitted only if the free blocks cover, besides its own predicted footprint,
the blocks every running request is still predicted to need. The reservation is
bookkeeping, not allocation: blocks are still taken as tokens arrive, so a wrong prediction
costs at worst a preemption (as without reservation) or some idle blocks, never a result.
"""

from __future__ import annotations

import math

from gridllm.common.config import SchedulerConfig
from scheduler_svc.block_manager import BlockManager, KVBlock
from scheduler_svc.length_predictor import OnlinePredictor, OutputLengthPredictor
from scheduler_svc.request import Request, RequestStatus


class BlockReservation:
    """Args:
        predictor: guesses each request's output length.
        block_size: tokens per KV block.
        max_model_len: no request grows past it.
        prefetch_ratio: slack on the predicted length (0.1 reserves 10% more tokens).
    """

    def __init__(self, predictor: OutputLengthPredictor, block_size: int, max_model_len: int,
                 prefetch_ratio: float = 0.1):
        self.predictor = predictor
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.prefetch_ratio = prefetch_ratio

    def target_blocks(self, request: Request) -> int:
        """Blocks the request is expected to hold when it finishes (slack included)."""
        params = request.sampling_params
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        num_output = min(self.predictor.predict(request), max_tokens)
        # Past its prediction a request needs at least room for its next token.
        num_output = max(num_output, min(request.num_output_tokens
                                         + request.num_output_placeholders + 1, max_tokens))
        limit = min(request.num_prompt_tokens + max_tokens, self.max_model_len)
        num_tokens = min(request.num_prompt_tokens + num_output, limit)
        num_tokens = min(math.ceil(num_tokens * (1.0 + self.prefetch_ratio)), limit)
        return -(-num_tokens // self.block_size)

    def num_reserved_blocks(self, running: list[Request], block_manager: BlockManager) -> int:
        """Blocks the running requests are still predicted to take."""
        return sum(max(0, self.target_blocks(r) - len(block_manager.req_to_blocks.get(r.req_id,
                                                                                     ())))
                   for r in running)

    def admits(self, request: Request, computed_blocks: list[KVBlock], running: list[Request],
               block_manager: BlockManager) -> bool:
        """Whether ``request`` (whose prefix hit is ``computed_blocks``) may start now.

        Something always runs: with nothing running the request is admitted whatever its
        prediction, so a long one cannot starve.
        """
        if not running:
            return True
        # Hit blocks used by another request cost no free block; free cached ones do.
        num_shared = sum(1 for b in computed_blocks if b.ref_cnt > 0)
        num_needed = max(0, self.target_blocks(request) - num_shared)
        num_available = block_manager.num_free_blocks - self.num_reserved_blocks(
            running, block_manager)
        return num_needed <= num_available

    def observe(self, request: Request) -> None:
        """Learn from a finished request; aborted ones say nothing about lengths."""
        if request.status != RequestStatus.FINISHED_ABORTED:
            self.predictor.observe(request)


def make_block_reservation(config: SchedulerConfig, block_size: int
                           ) -> BlockReservation | None:
    """The reservation ``config.block_reservation`` asks for (None for ``"none"``)."""
    if config.block_reservation == "none":
        return None
    return BlockReservation(OnlinePredictor(), block_size, config.max_model_len,
                            config.prefetch_ratio)
