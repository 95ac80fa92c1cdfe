"""Turn one step's logits into token ids (vLLM v1 semantics) on the torch reference ops.

Order per row: allowed_token_ids, min_tokens, logit_bias, extra logits processors, penalties;
then greedy rows take the argmax and random rows go through temperature, min-p/top-k/top-p
(``kernels.torch_ref.filter_logits``) and an exponential race (the "Gumbel" trick) that uses
the row's own generator when it has one, so seeded rows reproduce whatever shares the batch.
Logprobs come from the raw logits. Stages that no row needs are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridllm.common.contract import TokenLogprobs
from gridllm.common.sampling_params import SamplingParams
from kernels import torch_ref
from worker_svc.logits_processors import (
    LogitsProcessorSpec,
    ProcessorBatch,
    get_logits_processor,
    registered_logits_processors,
)

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    # [B] int64 sampled token ids.
    token_ids: torch.Tensor
    # Per row: its TokenLogprobs where params.logprobs is set, else None; None if no row asks.
    logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class SamplingMetadata:
    """Per-step sampling state of a batch, as tensors; build it with ``SamplingMetadata.build``."""

    params: list[SamplingParams]
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # [R] int64: rows sampled at random (greedy rows take the argmax).
    random_rows: torch.Tensor
    # [R] float32 temperatures of the random rows.
    temperature: torch.Tensor
    # Position in random_rows -> that row's own generator.
    generators: dict[int, torch.Generator]
    # [R] filters of the random rows; all None when no random row filters.
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    # [B] penalties, [B, V] prompt token mask and output token counts; None without penalties.
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    output_counts: torch.Tensor | None
    # [B, V] bool, True where allowed_token_ids forbids the token; None if no row restricts.
    disallowed_mask: torch.Tensor | None
    # (rows, token ids) that min_tokens masks this step.
    min_tokens_index: tuple[torch.Tensor, torch.Tensor] | None
    # (rows, token ids) and values of logit_bias.
    logit_bias_index: tuple[torch.Tensor, torch.Tensor] | None
    logit_bias_values: torch.Tensor | None
    # Extra processors in registration order, with their rows (None: every row).
    processors: list[tuple[LogitsProcessorSpec, torch.Tensor | None, ProcessorBatch]]
    # Per row: params.logprobs; and their maximum (None if no row asks).
    num_logprobs: list[int | None]
    max_num_logprobs: int | None

    @property
    def has_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def needs_logits_processing(self) -> bool:
        return (self.has_penalties or self.disallowed_mask is not None
                or self.min_tokens_index is not None or self.logit_bias_index is not None
                or bool(self.processors))

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None],
              eos_token_ids: list[int | None], vocab_size: int,
              device: torch.device) -> SamplingMetadata:
        """Gather one step's per-row sampling state into tensors on ``device``.

        Args:
            params: each row's sampling params (already verified, token ids < vocab_size).
            prompt_token_ids: each row's prompt.
            output_token_ids: each row's tokens generated so far.
            generators: each row's own generator (on ``device``), or None for the sampler's.
            eos_token_ids: each row's EOS token (None: no EOS).
            vocab_size: columns of the logits.
            device: where the logits live.

        Returns:
            The metadata the ``Sampler`` consumes.
        """
        num_rows = len(params)
        lengths = {"prompt_token_ids": len(prompt_token_ids),
                   "output_token_ids": len(output_token_ids),
                   "generators": len(generators), "eos_token_ids": len(eos_token_ids)}
        for name, length in lengths.items():
            if length != num_rows:
                raise ValueError(f"{name} must have one entry per row ({num_rows}), "
                                 f"got {length}.")

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        rand_params = [params[i] for i in random_rows]
        needs_filter = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in rand_params)

        has_penalties = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                            or p.repetition_penalty != 1.0 for p in params)
        output_counts = prompt_mask = None
        if has_penalties:
            output_counts = _count_tokens(output_token_ids, vocab_size, device)
            prompt_mask = _count_tokens(prompt_token_ids, vocab_size, device) > 0

        disallowed_mask = None
        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
        if allowed_rows:
            disallowed_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
            disallowed_mask[tensor(allowed_rows, torch.long)] = True
            pairs = [(i, t) for i in allowed_rows for t in params[i].allowed_token_ids or []]
            disallowed_mask[_index(pairs, device)] = False

        min_tokens_pairs = []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                stop_ids = set(p.stop_token_ids or [])
                eos = eos_token_ids[i]
                if not p.ignore_eos and eos is not None:
                    stop_ids.add(eos)
                min_tokens_pairs += [(i, t) for t in sorted(stop_ids)]

        bias_pairs = [(i, t) for i, p in enumerate(params) for t in (p.logit_bias or {})]
        bias_values = [b for p in params for b in (p.logit_bias or {}).values()]

        for name in {n for p in params for n in p.logits_processors or []}:
            get_logits_processor(name)  # Unknown names raise ValueError here.
        processors = []
        for name in registered_logits_processors():
            rows = [i for i, p in enumerate(params) if name in (p.logits_processors or [])]
            if rows:
                batch = ProcessorBatch([params[i] for i in rows],
                                       [prompt_token_ids[i] for i in rows],
                                       [output_token_ids[i] for i in rows])
                row_index = None if len(rows) == num_rows else tensor(rows, torch.long)
                processors.append((get_logits_processor(name), row_index, batch))

        row_generators: dict[int, torch.Generator] = {}
        for pos, row in enumerate(random_rows):
            generator = generators[row]
            if generator is not None:
                row_generators[pos] = generator

        num_logprobs = [p.logprobs for p in params]
        requested = [n for n in num_logprobs if n is not None]

        def penalty(attr: str) -> torch.Tensor | None:
            return tensor([getattr(p, attr) for p in params], torch.float32) \
                if has_penalties else None

        def rand_filter(attr: str, dtype: torch.dtype) -> torch.Tensor | None:
            return tensor([getattr(p, attr) for p in rand_params], dtype) if needs_filter else None

        return cls(
            params=params,
            vocab_size=vocab_size,
            all_greedy=not random_rows,
            all_random=len(random_rows) == num_rows,
            random_rows=tensor(random_rows, torch.long),
            temperature=tensor([p.temperature for p in rand_params], torch.float32),
            generators=row_generators,
            top_k=rand_filter("top_k", torch.long),
            top_p=rand_filter("top_p", torch.float32),
            min_p=rand_filter("min_p", torch.float32),
            presence_penalty=penalty("presence_penalty"),
            frequency_penalty=penalty("frequency_penalty"),
            repetition_penalty=penalty("repetition_penalty"),
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            disallowed_mask=disallowed_mask,
            min_tokens_index=_index(min_tokens_pairs, device) if min_tokens_pairs else None,
            logit_bias_index=_index(bias_pairs, device) if bias_pairs else None,
            logit_bias_values=tensor(bias_values, torch.float32) if bias_pairs else None,
            processors=processors,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(requested) if requested else None,
        )


class Sampler:
    """Samples one token per row of a step's logits.

    Args:
        seed: seed of the generator used by rows without their own; None uses torch's
            global generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample ``logits[B, V]`` (not modified).

        Returns:
            The sampled token ids and, for rows that ask, their raw logprobs.
        """
        if logits.dim() != 2 or logits.shape != (len(meta.params), meta.vocab_size):
            raise ValueError(f"logits must have shape ({len(meta.params)}, {meta.vocab_size}), "
                             f"got {tuple(logits.shape)}.")
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        token_ids = self.sample(self.process_logits(logits, meta), meta)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, token_ids, meta.num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def process_logits(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Apply allowed_token_ids, min_tokens, logit_bias, extra processors and penalties.

        Returns:
            New float32 logits (or ``logits`` itself when no row needs any of these).
        """
        if not meta.needs_logits_processing:
            return logits
        logits = logits.float().clone()
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
        if meta.has_penalties:
            assert meta.prompt_mask is not None and meta.output_counts is not None
            assert meta.presence_penalty is not None and meta.frequency_penalty is not None
            assert meta.repetition_penalty is not None
            logits = torch_ref.apply_penalties(
                logits, meta.prompt_mask, meta.output_counts, meta.presence_penalty,
                meta.frequency_penalty, meta.repetition_penalty)
        return logits

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Greedy rows: argmax; random rows: temperature, filters, then a draw.

        Returns:
            [B] int64 token ids.
        """
        if meta.all_greedy:
            return logits.argmax(dim=-1)
        rand_logits = logits if meta.all_random else logits[meta.random_rows]
        rand_logits = rand_logits / meta.temperature[:, None]
        if meta.top_k is not None:
            assert meta.top_p is not None and meta.min_p is not None
            rand_logits = torch_ref.filter_logits(rand_logits, meta.top_k, meta.top_p, meta.min_p)
        sampled = self._exponential_race(rand_logits.softmax(dim=-1), meta.generators)
        if meta.all_random:
            return sampled
        return logits.argmax(dim=-1).index_copy_(0, meta.random_rows, sampled)

    def _exponential_race(self, probs: torch.Tensor,
                          generators: dict[int, torch.Generator]) -> torch.Tensor:
        # argmax(p / q) with q ~ Exp(1) draws from p; each seeded row draws its own q.
        q = torch.empty_like(probs)
        if len(generators) < probs.shape[0]:
            q.exponential_(generator=self._generator(probs.device))
        for pos, generator in generators.items():
            q[pos].exponential_(generator=generator)
        # A zero draw would make a filtered token's 0 / 0 a NaN, which argmax would pick.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator


def compute_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                           num_top: int) -> list[TokenLogprobs]:
    """Logprobs of ``token_ids`` under ``log_softmax(logits)``, plus the top ``num_top``.

    Used for sampled tokens and for prompt_logprobs. A rank is 1 + the number of tokens
    strictly more likely.

    Args:
        logits: [N, V] raw logits.
        token_ids: [N] int64, the token whose logprob each row reports first.
        num_top: how many most likely tokens follow it (0: only the token itself).

    Returns:
        One TokenLogprobs per row.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _to_token_logprobs(logprobs, token_ids, [num_top] * logprobs.shape[0])


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                     num_logprobs: list[int | None]) -> list[TokenLogprobs | None]:
    rows = [i for i, n in enumerate(num_logprobs) if n is not None]
    if len(rows) < len(num_logprobs):
        index = torch.tensor(rows, dtype=torch.long, device=logprobs.device)
        logprobs, token_ids = logprobs[index], token_ids[index]
    computed = _to_token_logprobs(logprobs, token_ids, [num_logprobs[i] or 0 for i in rows])
    result: list[TokenLogprobs | None] = [None] * len(num_logprobs)
    for row, entry in zip(rows, computed, strict=True):
        result[row] = entry
    return result


def _to_token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                       num_tops: list[int]) -> list[TokenLogprobs]:
    token_ids = token_ids.long()
    token_lp = logprobs.gather(-1, token_ids[:, None])
    token_rank = (logprobs > token_lp).sum(dim=-1, keepdim=True) + 1
    ids, lps, ranks = token_ids[:, None], token_lp, token_rank
    k = min(max(num_tops, default=0), logprobs.shape[-1])
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        # Every token strictly more likely than a top-k token is itself in the top k.
        neg = -top_lp
        top_ranks = torch.searchsorted(neg, neg) + 1
        ids = torch.cat((ids, top_ids), dim=-1)
        lps = torch.cat((lps, top_lp), dim=-1)
        ranks = torch.cat((ranks, top_ranks), dim=-1)
    return [TokenLogprobs(token_ids=i[:n + 1], logprobs=lp[:n + 1], ranks=r[:n + 1])
            for i, lp, r, n in zip(ids.tolist(), lps.tolist(), ranks.tolist(), num_tops,
                                   strict=True)]


def _count_tokens(token_ids: list[list[int]], vocab_size: int,
                  device: torch.device) -> torch.Tensor:
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
