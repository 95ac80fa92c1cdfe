"""One step's per-row sampling state as tensors (``SamplingMetadata``).

The model runner slices it out of its persistent input batch (``InputBatch``); ``build``
gathers it from Python lists, for tests and one-off use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gridllm.common.sampling_params import SamplingParams
from worker_svc.logits_processors import (
    LogitsProcessorSpec,
    ProcessorBatch,
    get_logits_processor,
    registered_logits_processors,
)

# Philox keys are non-negative int64.
SEED_MASK = (1 << 63) - 1


@dataclass
class SamplingMetadata:
    """Per-step sampling state of a batch of ``num_rows`` rows."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    # [B] float32 temperature; greedy rows hold 0.
    temperature: torch.Tensor
    # [B] int64 top_k (<= 0: off), float32 top_p (1: off) and min_p (0: off).
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    # False when no random row filters (the filter pass is skipped).
    needs_filter: bool
    # [B] int64 Philox key of each row and its counter: the position of the token being
    # sampled in the request's output, so a draw is a function of (seed, position) alone.
    seeds: torch.Tensor
    offsets: torch.Tensor
    # Rows without a seed of their own: the sampler draws their keys afresh per call.
    unseeded_rows: torch.Tensor | None = None
    # True when no random row filters by top-k (by top-p): the sampling kernel launches
    # the first pass of that search only.
    no_top_k: bool = False
    no_top_p: bool = False
    # [B] penalties, [B, V] prompt token mask and output token counts; None without penalties.
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    # [B, V] bool, True where allowed_token_ids forbids the token; None if no row restricts.
    disallowed_mask: torch.Tensor | None = None
    # (rows, token ids) that min_tokens masks this step.
    min_tokens_index: tuple[torch.Tensor, torch.Tensor] | None = None
    # (rows, token ids) and values of logit_bias.
    logit_bias_index: tuple[torch.Tensor, torch.Tensor] | None = None
    logit_bias_values: torch.Tensor | None = None
    # Structured outputs: [R, ceil(V / 32)] int32 bitmasks of allowed tokens (bit t % 32 of
    # word t // 32) and the [R] rows they apply to; None if no row is constrained.
    token_bitmask: torch.Tensor | None = None
    bitmask_rows: torch.Tensor | None = None
    # Extra processors in registration order, with their rows (None: every row).
    processors: list[tuple[LogitsProcessorSpec, torch.Tensor | None, ProcessorBatch]] = \
        field(default_factory=list)
    # Per row: params.logprobs; and their maximum (None if no row asks).
    num_logprobs: list[int | None] = field(default_factory=list)
    max_num_logprobs: int | None = None

    @property
    def has_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def needs_logits_processing(self) -> bool:
        """True if any row needs a stage before the draw (masks, bias, processors, penalties)."""
        return self.has_penalties or self.needs_masking

    @property
    def needs_masking(self) -> bool:
        """True if any row needs a grammar's bitmask, allowed_token_ids, min_tokens,
        logit_bias or a processor."""
        return (self.token_bitmask is not None or self.disallowed_mask is not None
                or self.min_tokens_index is not None
                or self.logit_bias_index is not None or bool(self.processors))

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], seeds: list[int | None],
              eos_token_ids: list[int | None], vocab_size: int, device: torch.device,
              offsets: list[int] | None = None) -> SamplingMetadata:
        """Gather one step's per-row sampling state into tensors on ``device``.

        Args:
            params: each row's sampling params (already verified, token ids < vocab_size).
            prompt_token_ids: each row's prompt.
            output_token_ids: each row's tokens generated so far.
            seeds: each row's Philox key, or None for a key the sampler draws per call.
            eos_token_ids: each row's EOS token (None: no EOS).
            vocab_size: columns of the logits.
            device: where the logits live.
            offsets: each row's counter; default: its number of output tokens so far.

        Returns:
            The metadata the ``Sampler`` consumes.
        """
        num_rows = len(params)
        lengths = {"prompt_token_ids": len(prompt_token_ids),
                   "output_token_ids": len(output_token_ids),
                   "seeds": len(seeds), "eos_token_ids": len(eos_token_ids)}
        if offsets is not None:
            lengths["offsets"] = len(offsets)
        for name, length in lengths.items():
            if length != num_rows:
                raise ValueError(f"{name} must have one entry per row ({num_rows}), "
                                 f"got {length}.")

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        if offsets is None:
            offsets = [len(ids) for ids in output_token_ids]
        unseeded = [i for i, s in enumerate(seeds) if s is None]
        has_penalties = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                            or p.repetition_penalty != 1.0 for p in params)
        meta = cls(
            num_rows=num_rows, vocab_size=vocab_size,
            all_greedy=all(p.is_greedy for p in params),
            temperature=tensor([0.0 if p.is_greedy else p.temperature for p in params],
                               torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            min_p=tensor([p.min_p for p in params], torch.float32),
            needs_filter=any(not p.is_greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0)
                             for p in params),
            no_top_k=not any(not p.is_greedy and p.top_k > 0 for p in params),
            no_top_p=not any(not p.is_greedy and p.top_p < 1.0 for p in params),
            seeds=tensor([0 if s is None else s & SEED_MASK for s in seeds], torch.long),
            offsets=tensor(offsets, torch.long),
            unseeded_rows=tensor(unseeded, torch.long) if unseeded else None,
            num_logprobs=[p.logprobs for p in params])
        if has_penalties:
            meta.presence_penalty = tensor([p.presence_penalty for p in params], torch.float32)
            meta.frequency_penalty = tensor([p.frequency_penalty for p in params],
                                            torch.float32)
            meta.repetition_penalty = tensor([p.repetition_penalty for p in params],
                                             torch.float32)
            meta.output_counts = count_tokens(output_token_ids, vocab_size, device)
            meta.prompt_mask = count_tokens(prompt_token_ids, vocab_size, device) > 0
        meta.set_masks(list(range(num_rows)), params,
                       [len(ids) for ids in output_token_ids], eos_token_ids, device)
        meta.set_processors(list(range(num_rows)), params, prompt_token_ids,
                            output_token_ids, device)
        requested = [n for n in meta.num_logprobs if n is not None]
        meta.max_num_logprobs = max(requested) if requested else None
        return meta

    def set_masks(self, rows: list[int], params: list[SamplingParams],
                  num_output_tokens: list[int], eos_token_ids: list[int | None],
                  device: torch.device) -> None:
        """Fill allowed_token_ids, min_tokens and logit_bias for ``rows`` (with their
        params, output counts and EOS ids); the other rows need none of them."""
        allowed = [(r, p) for r, p in zip(rows, params, strict=True)
                   if p.allowed_token_ids is not None]
        if allowed:
            mask = torch.zeros(self.num_rows, self.vocab_size, dtype=torch.bool)
            for r, p in allowed:
                mask[r] = True
                mask[r, p.allowed_token_ids] = False
            self.disallowed_mask = mask.to(device)
        min_tokens_pairs = []
        for r, p, num_out, eos in zip(rows, params, num_output_tokens, eos_token_ids,
                                      strict=True):
            if num_out < p.min_tokens:
                stop_ids = set(p.stop_token_ids or [])
                if not p.ignore_eos and eos is not None:
                    stop_ids.add(eos)
                min_tokens_pairs += [(r, t) for t in sorted(stop_ids)]
        if min_tokens_pairs:
            self.min_tokens_index = _index(min_tokens_pairs, device)
        bias_pairs = [(r, t) for r, p in zip(rows, params, strict=True)
                      for t in (p.logit_bias or {})]
        if bias_pairs:
            self.logit_bias_index = _index(bias_pairs, device)
            self.logit_bias_values = torch.tensor(
                [b for p in params for b in (p.logit_bias or {}).values()],
                dtype=torch.float32, device=device)

    def set_processors(self, rows: list[int], params: list[SamplingParams],
                       prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
                       device: torch.device) -> None:
        """Attach the extra logits processors that ``rows`` enable."""
        for name in {n for p in params for n in p.logits_processors or []}:
            get_logits_processor(name)  # Unknown names raise ValueError here.
        for name in registered_logits_processors():
            picked = [k for k, p in enumerate(params) if name in (p.logits_processors or [])]
            if not picked:
                continue
            batch = ProcessorBatch([params[k] for k in picked],
                                   [prompt_token_ids[k] for k in picked],
                                   [output_token_ids[k] for k in picked])
            picked_rows = [rows[k] for k in picked]
            index = (None if picked_rows == list(range(self.num_rows))
                     else torch.tensor(picked_rows, dtype=torch.long, device=device))
            self.processors.append((get_logits_processor(name), index, batch))


def count_tokens(token_ids: list[list[int]], vocab_size: int,
                 device: torch.device) -> torch.Tensor:
    """``[len(token_ids), vocab_size]`` int32 occurrence counts."""
    # Pad with vocab_size into a spare column, scatter-add, drop the column.
    max_len = max((len(ids) for ids in token_ids), default=0)
    padded = torch.tensor([ids + [vocab_size] * (max_len - len(ids)) for ids in token_ids],
                          dtype=torch.long, device=device).view(len(token_ids), max_len)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def _index(pairs: list[tuple[int, int]], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=device)
    tokens = torch.tensor([t for _, t in pairs], dtype=torch.long, device=device)
    return rows, tokens
