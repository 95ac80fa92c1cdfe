"""Length-aware admission: keep KV room for what running requests are predicted to generate.

Without it the scheduler admits a request as soon as its prompt fits; under KV pressure the
running requests then outgrow the pool and some are preempted and recomputed. With it, a
request is admitted only if the pool covers the predicted peak of the KV footprint of the
running requests plus the new one: each holds its prompt and grows by a token per step until
its predicted length (with ``prefetch_ratio`` slack), then frees everything. Requests finish
at different times, so the peak is lower than the sum of final sizes; reserving the sum
would leave the pool half idle.

The reservation is bookkeeping, not allocation: blocks are still taken as tokens arrive, so
a wrong prediction costs at worst a preemption (as without reservation) or some idle
blocks, never a different result.
"""

from __future__ import annotations

import math

from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ModelLimits
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
        # Predicted output length per request, fixed when first asked (at admission).
        self._predicted: dict[str, int] = {}

    def target_tokens(self, request: Request) -> int:
        """Tokens the request is expected to hold when it finishes (slack included)."""
        params = request.sampling_params
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        predicted = self._predicted.get(request.req_id)
        if predicted is None:
            predicted = self._predicted[request.req_id] = self.predictor.predict(request)
        num_output = min(predicted, max_tokens)
        # Past its prediction a request needs at least room for its next token.
        num_output = max(num_output, min(request.num_output_tokens
                                         + request.num_output_placeholders + 1, max_tokens))
        limit = min(request.num_prompt_tokens + max_tokens, self.max_model_len)
        num_tokens = min(request.num_prompt_tokens + num_output, limit)
        return min(math.ceil(num_tokens * (1.0 + self.prefetch_ratio)), limit)

    def target_blocks(self, request: Request) -> int:
        """Blocks the request is expected to hold when it finishes (slack included)."""
        return -(-self.target_tokens(request) // self.block_size)

    def peak_blocks(self, requests: list[Request]) -> int:
        """Predicted peak of the blocks ``requests`` hold together from now on.

        Each request holds all its tokens so far (its prompt counted whole, even if chunked
        prefill has not reached its end) and grows by one token per step until its target,
        when it frees its blocks.
        """
        # (tokens held now, tokens still to come), by how long each request has left.
        spans = sorted(((r.num_tokens + r.num_output_placeholders,
                         max(0, self.target_tokens(r) - r.num_tokens
                             - r.num_output_placeholders)) for r in requests),
                       key=lambda span: span[1])
        # Within a stretch where no request finishes demand only grows, so the peak is at
        # a step just before some request finishes (or now). A partly filled last block
        # counts whole: block_size - 1 extra tokens per request.
        peak, held_after = 0, sum(held for held, _ in spans)
        for k, (held, remaining) in enumerate(spans):
            num_active = len(spans) - k
            step = max(remaining - 1, 0)
            num_tokens = held_after + num_active * (step + self.block_size - 1)
            peak = max(peak, num_tokens // self.block_size)
            held_after -= held
        return peak

    def admits(self, request: Request, computed_blocks: list[KVBlock], running: list[Request],
               block_manager: BlockManager) -> bool:
        """Whether ``request`` (whose prefix hit is ``computed_blocks``) may start now.

        Something always runs: with nothing running the request is admitted whatever its
        prediction, so a long one cannot starve.
        """
        if not running:
            return True
        held = sum(block_manager.num_held_blocks(r.req_id) for r in running)
        # Hit blocks used by another request are counted twice in the peak: give them back.
        num_shared = sum(1 for b in computed_blocks if b.ref_cnt > 0)
        peak = self.peak_blocks([*running, request]) - num_shared
        return peak <= block_manager.num_free_blocks + held

    def observe(self, request: Request) -> None:
        """Forget a finished request; learn from it unless it was aborted (an abort says
        nothing about lengths)."""
        self._predicted.pop(request.req_id, None)
        if request.status != RequestStatus.FINISHED_ABORTED:
            self.predictor.observe(request)


def make_block_reservation(config: SchedulerConfig, limits: ModelLimits
                           ) -> BlockReservation | None:
    """The reservation ``config.block_reservation`` asks for (None for ``"none"``)."""
    if config.block_reservation == "none":
        return None
    return BlockReservation(OnlinePredictor(), limits.block_size, limits.max_model_len,
                            config.prefetch_ratio)
