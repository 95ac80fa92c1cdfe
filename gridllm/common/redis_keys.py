"""Redis key layout shared by the router, scheduler and workers.

Registry (JSON values, refreshed with a TTL so a dead process disappears):
    gridllm:worker:<worker_id>       -> WorkerInfo fields + "address"
    gridllm:scheduler:<scheduler_id> -> {"scheduler_id", "address", "model", "block_size",
                                         "worker_ids", "num_requests_running",
                                         "num_requests_waiting", "kv_blocks_total",
                                         "kv_blocks_free"}
Block-state mirror per worker (written by the scheduler that drives it):
    gridllm:kv:<worker_id>:cached  HASH str(block_hash) -> "<block_id>:<version>:<t0>,<t1>,..."
    gridllm:kv:<worker_id>:state   HASH num_blocks, num_free_blocks, num_running,
                                        num_waiting, block_size, instance_id, scheduler_id
    gridllm:kv:<worker_id>:tables  HASH req_id -> "<b0>,<b1>,..."
Block hashes are scheduler_svc.block_manager.hash_block chains, so a router can test
prefix overlap with HMGET on the cached hash. ``version`` is the block's allocation count
(gridllm.common.block_versions) when its KV was computed.
"""

from __future__ import annotations

PREFIX = "gridllm"
WORKER_PATTERN = f"{PREFIX}:worker:*"
SCHEDULER_PATTERN = f"{PREFIX}:scheduler:*"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def scheduler_key(scheduler_id: str) -> str:
    return f"{PREFIX}:scheduler:{scheduler_id}"


def kv_cached_key(worker_id: str) -> str:
    return f"{PREFIX}:kv:{worker_id}:cached"


def kv_state_key(worker_id: str) -> str:
    return f"{PREFIX}:kv:{worker_id}:state"


def kv_tables_key(worker_id: str) -> str:
    return f"{PREFIX}:kv:{worker_id}:tables"


def encode_cached_block(block_id: int, version: int,
                        token_ids: tuple[int, ...] | list[int]) -> str:
    return f"{block_id}:{version}:{','.join(map(str, token_ids))}"


def decode_cached_block(value: str | bytes) -> tuple[int, int, tuple[int, ...]]:
    """Returns:
        (block id, version, token ids).
    """
    if isinstance(value, bytes):
        value = value.decode()
    block_id, version, tokens = value.split(":", 2)
    return int(block_id), int(version), tuple(int(t) for t in tokens.split(",") if t)
