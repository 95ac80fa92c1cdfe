"""Turn one step's logits into token ids (vLLM v1 semantics).

Order per row: a structured output's token bitmask, allowed_token_ids, min_tokens,
logit_bias, extra logits processors (torch, and only when some row asks), then penalties,
greedy argmax or temperature, min-p/top-k/top-p and a draw. The last stages run in one
fused Triton kernel on CUDA (``kernels.sampling.sample``; a batch of greedy rows alone,
``kernels.argmax.argmax``) and in ``kernels.torch_ref.sample`` elsewhere. Both draw with
Philox keyed by the row's seed and counted by the position of the token in the request's
output, so a seeded request samples the same tokens in any batch and after a resubmission.
Logprobs come from the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridllm.common.contract import TokenLogprobs
from gridllm.common.sampling_params import SamplingParams
from kernels import torch_ref
from worker_svc.logprobs import LogprobsTensors, compute_token_logprobs
from worker_svc.sampling_metadata import SEED_MASK, SamplingMetadata

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "compute_token_logprobs"]

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    # [B] int64 sampled token ids.
    token_ids: torch.Tensor
    # Rows that asked for logprobs (batch order) and their tensors; None if no row asks.
    logprobs_rows: list[int] | None = None
    logprobs_tensors: LogprobsTensors | None = None
    # Per row: params.logprobs.
    num_logprobs: list[int | None] | None = None

    @property
    def logprobs(self) -> list[TokenLogprobs | None] | None:
        """Per row: its TokenLogprobs where params.logprobs is set, else None (reads the
        device tensors: a sync)."""
        if self.logprobs_tensors is None:
            return None
        assert self.logprobs_rows is not None and self.num_logprobs is not None
        entries = self.logprobs_tensors.to_lists(
            [self.num_logprobs[r] or 0 for r in self.logprobs_rows])
        result: list[TokenLogprobs | None] = [None] * len(self.num_logprobs)
        for row, entry in zip(self.logprobs_rows, entries, strict=True):
            result[row] = entry
        return result


class Sampler:
    """Samples one token per row of a step's logits.

    Args:
        seed: seed of the generator that keys rows without a seed of their own; None uses
            torch's global generator.
        use_kernel: run the fused Triton kernel; None: on CUDA only.
    """

    def __init__(self, seed: int | None = None, use_kernel: bool | None = None) -> None:
        self.seed = seed
        self.use_kernel = use_kernel
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample ``logits[B, V]`` (float32 or the LM head's 16-bit dtype; not modified);
        no host sync. The kernels read the logits as they are (each load converts to
        float32 first, so a float32 copy would change nothing), and so does the argmax of
        greedy rows alone; masks, logprobs and the torch path work on a float32 copy.

        Returns:
            The sampled token ids and, for rows that ask, their raw logprobs.
        """
        if logits.dim() != 2 or tuple(logits.shape) != (meta.num_rows, meta.vocab_size):
            raise ValueError(f"logits must have shape ({meta.num_rows}, {meta.vocab_size}), "
                             f"got {tuple(logits.shape)}.")
        if meta.max_num_logprobs is not None or not (
                self._uses_kernel(logits) or (meta.all_greedy and not meta.has_penalties)):
            logits = logits.float()
        token_ids = self.sample(self._mask(logits, meta), meta, with_penalties=True)
        output = SamplerOutput(token_ids=token_ids, num_logprobs=meta.num_logprobs)
        if meta.max_num_logprobs is not None:
            rows = [i for i, n in enumerate(meta.num_logprobs) if n is not None]
            raw, chosen = logits, token_ids
            if len(rows) < meta.num_rows:
                index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                raw, chosen = logits[index], token_ids[index]
            output.logprobs_rows = rows
            output.logprobs_tensors = LogprobsTensors.compute(
                torch.log_softmax(raw, dim=-1), chosen, meta.max_num_logprobs)
        return output

    def process_logits(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Apply the token bitmask, allowed_token_ids, min_tokens, logit_bias, extra
        processors and penalties.

        Returns:
            New float32 logits (or ``logits`` itself when no row needs any of these).
        """
        logits = self._mask(logits, meta)
        if meta.has_penalties:
            assert meta.prompt_mask is not None and meta.output_counts is not None
            assert meta.presence_penalty is not None and meta.frequency_penalty is not None
            assert meta.repetition_penalty is not None
            logits = torch_ref.apply_penalties(
                logits, meta.prompt_mask, meta.output_counts, meta.presence_penalty,
                meta.frequency_penalty, meta.repetition_penalty)
        return logits

    def _mask(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        # The stages before the penalties (which the draw applies itself).
        if not meta.needs_masking:
            return logits
        logits = logits.to(torch.float32, copy=True)
        if meta.token_bitmask is not None:
            assert meta.bitmask_rows is not None
            if self._uses_kernel(logits):
                from kernels.token_bitmask import apply_token_bitmask

                apply_token_bitmask(logits, meta.token_bitmask, meta.bitmask_rows)
            elif logits.device.type == "cpu":
                from kernels.token_bitmask import apply_token_bitmask_cpu

                apply_token_bitmask_cpu(logits, meta.token_bitmask, meta.bitmask_rows)
            else:
                torch_ref.apply_token_bitmask(logits, meta.token_bitmask, meta.bitmask_rows)
        if meta.disallowed_mask is not None:
            logits.masked_fill_(meta.disallowed_mask, _NEG_INF)
        if meta.min_tokens_index is not None:
            logits[meta.min_tokens_index] = _NEG_INF
        if meta.logit_bias_index is not None:
            assert meta.logit_bias_values is not None
            logits.index_put_(meta.logit_bias_index, meta.logit_bias_values, accumulate=True)
        for spec, rows, batch in meta.processors:
            if rows is None:
                logits = spec.fn(logits, batch)
            else:
                logits[rows] = spec.fn(logits[rows], batch)
        return logits

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata,
               with_penalties: bool = False) -> torch.Tensor:
        """Greedy rows: argmax; random rows: temperature, filters, then a draw keyed by
        (seed, offset). ``with_penalties`` applies the penalties first.

        Returns:
            [B] int64 token ids.
        """
        has_penalties = with_penalties and meta.has_penalties
        if meta.all_greedy and not has_penalties:
            if self._uses_kernel(logits):
                from kernels.argmax import argmax

                return argmax(logits)
            return logits.argmax(dim=-1)
        penalties = {}
        if has_penalties:
            penalties = dict(prompt_mask=meta.prompt_mask, output_counts=meta.output_counts,
                             presence_penalty=meta.presence_penalty,
                             frequency_penalty=meta.frequency_penalty,
                             repetition_penalty=meta.repetition_penalty)
        seeds = self._seeds(meta)
        if self._uses_kernel(logits):
            from kernels.sampling import sample as kernel

            return kernel(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p,
                          seeds, meta.offsets, no_top_k=meta.no_top_k,
                          no_top_p=meta.no_top_p, **penalties)
        return torch_ref.sample(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p,
                                seeds, meta.offsets, needs_filter=meta.needs_filter,
                                **penalties)

    def request_seed(self, params: SamplingParams) -> int:
        """A request's Philox key: its own seed, else one drawn from this sampler's
        generator (reproducible given the sampler's seed and the admission order)."""
        if params.seed is not None:
            return params.seed & SEED_MASK
        return int(torch.randint(0, SEED_MASK, (1,), generator=self._cpu_generator()))

    def _cpu_generator(self) -> torch.Generator | None:
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def _uses_kernel(self, logits: torch.Tensor) -> bool:
        return logits.is_cuda if self.use_kernel is None else self.use_kernel

    def _seeds(self, meta: SamplingMetadata) -> torch.Tensor:
        if meta.unseeded_rows is None:
            return meta.seeds
        fresh = torch.randint(0, SEED_MASK, (meta.unseeded_rows.shape[0],),
                              generator=self._cpu_generator())
        return meta.seeds.index_copy(0, meta.unseeded_rows, fresh.to(meta.seeds.device))
