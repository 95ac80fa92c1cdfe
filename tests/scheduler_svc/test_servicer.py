"""Coalescing of the updates a slow Submit stream fell behind on."""

from __future__ import annotations

from gridllm.common.contract import FinishReason, RequestUpdate, TokenLogprobs
from scheduler_svc.servicer import _merge


def test_merge_concatenates_and_keeps_the_last_finish():
    lp = [TokenLogprobs([4], [-0.5], [1])]
    first = RequestUpdate("r", [4], lp, None, num_cached_tokens=8)
    second = RequestUpdate("r", [9, 1], lp + lp, lp, FinishReason.STOP, 1, 8)
    merged = _merge(first, second)
    assert merged.new_token_ids == [4, 9, 1]
    assert merged.new_logprobs == lp * 3 and merged.new_prompt_logprobs == lp
    assert (merged.finish_reason, merged.stop_reason, merged.num_cached_tokens) == (
        FinishReason.STOP, 1, 8)
    plain = _merge(RequestUpdate("r", [1]), RequestUpdate("r", [2]))
    assert plain.new_logprobs is None and plain.new_prompt_logprobs is None
