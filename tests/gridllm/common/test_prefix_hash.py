"""gridllm.common.prefix_hash: prompt hashes match the block manager's, chained and salted."""

from __future__ import annotations

import pytest

from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.request import Request

BLOCK_SIZE = 4


@pytest.mark.parametrize("num_tokens", [1, 4, 5, 8, 9, 15])
def test_prompt_hashes_match_block_manager(num_tokens):
    tokens = [(7 * i + 3) % 50 for i in range(num_tokens)]
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    request = Request("r", tokens, SamplingParams())
    assert manager.allocate_slots(request, num_tokens) is not None
    stored, _ = manager.drain_events()
    ours = prompt_block_hashes(tokens, BLOCK_SIZE)
    # Reusable blocks only: the scheduler always computes the prompt's last token.
    assert len(ours) == (num_tokens - 1) // BLOCK_SIZE
    assert stored[:len(ours)] == ours
    # And a second request with the same prompt hits exactly those blocks.
    _, num_hit = manager.get_computed_blocks(Request("s", tokens, SamplingParams()))
    assert num_hit == len(ours) * BLOCK_SIZE


def test_prompt_hashes_depend_on_salt_and_prefix():
    tokens = list(range(12))
    assert prompt_block_hashes(tokens, BLOCK_SIZE) != prompt_block_hashes(tokens, BLOCK_SIZE, "t")
    other = [99] + tokens[1:]
    # A different first block changes every chained hash after it.
    assert not set(prompt_block_hashes(tokens, BLOCK_SIZE)) & set(
        prompt_block_hashes(other, BLOCK_SIZE))
