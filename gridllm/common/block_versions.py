"""Block versions: how many times each KV block was handed out for new content.

Scheduler and worker count the same allocations from the same steps, so their counts
agree. A mirrored prefix-cache entry records the version its block had when its KV was
computed; after a scheduler restart an entry is trusted only if the worker's version is
unchanged, i.e. nothing overwrote the block since (even if the old scheduler died before
mirroring the eviction).
"""

from __future__ import annotations

from gridllm.common.contract import SchedulerOutput


def fresh_block_ids(output: SchedulerOutput, block_size: int) -> list[int]:
    """Blocks this step writes new content into (prefix-cache hits excluded)."""
    block_ids = []
    for new in output.scheduled_new_reqs:
        # The first num_computed_tokens // block_size blocks are prefix-cache hits (or,
        # in a windowed KV group, placeholders before the window).
        num_hit = new.num_computed_tokens // block_size
        block_ids += new.block_ids[num_hit:]
        for group_ids in new.group_block_ids:
            block_ids += group_ids[num_hit:]
    for cached in output.scheduled_cached_reqs:
        block_ids += cached.new_block_ids
        for group_ids in cached.new_group_block_ids:
            block_ids += group_ids
    return block_ids


def bump_versions(versions: list[int], output: SchedulerOutput, block_size: int) -> None:
    for block_id in fresh_block_ids(output, block_size):
        versions[block_id] += 1
