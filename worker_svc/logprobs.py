"""Logprobs as device tensors, turned into ``TokenLogprobs`` lists only when read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridllm.common.contract import TokenLogprobs


@dataclass
class LogprobsTensors:
    """Per row: a token's logprob and rank, then the top ``k`` tokens (column 0 first)."""

    # [N, 1 + k] int64 token ids, float32 logprobs, int64 ranks (1 = most likely).
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    @classmethod
    def compute(cls, logprobs: torch.Tensor, token_ids: torch.Tensor,
                num_top: int) -> LogprobsTensors:
        """Args:
            logprobs: [N, V] normalised log-probabilities.
            token_ids: [N] the token each row reports first.
            num_top: how many most likely tokens follow it.
        """
        token_ids = token_ids.long()
        token_lp = logprobs.gather(-1, token_ids[:, None])
        token_rank = (logprobs > token_lp).sum(dim=-1, keepdim=True) + 1
        ids, lps, ranks = token_ids[:, None], token_lp, token_rank
        k = min(num_top, logprobs.shape[-1])
        if k > 0:
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            # Every token strictly more likely than a top-k token is itself in the top k.
            neg = -top_lp
            top_ranks = torch.searchsorted(neg, neg) + 1
            ids = torch.cat((ids, top_ids), dim=-1)
            lps = torch.cat((lps, top_lp), dim=-1)
            ranks = torch.cat((ranks, top_ranks), dim=-1)
        return cls(ids, lps, ranks)

    def to_host(self) -> LogprobsTensors:
        """Copies into pinned host memory, queued on the current stream (no wait)."""
        if self.token_ids.device.type == "cpu":
            return self
        return LogprobsTensors(*(_pinned_copy(t) for t in
                                 (self.token_ids, self.logprobs, self.ranks)))

    def to_lists(self, num_tops: list[int]) -> list[TokenLogprobs]:
        """One TokenLogprobs per row, keeping ``1 + num_tops[row]`` entries (host tensors
        whose copy has completed)."""
        return [TokenLogprobs(token_ids=i[:n + 1], logprobs=lp[:n + 1], ranks=r[:n + 1])
                for i, lp, r, n in zip(self.token_ids.tolist(), self.logprobs.tolist(),
                                       self.ranks.tolist(), num_tops, strict=True)]


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


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
    tensors = LogprobsTensors.compute(logprobs, token_ids, num_top)
    return tensors.to_lists([num_top] * logprobs.shape[0])
