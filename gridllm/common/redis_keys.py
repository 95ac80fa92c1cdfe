"""Redis key layout shared by the router, scheduler and workers.

Registry (JSON values, refreshed with a TTL so a dead process disappears):
    gridllm:worker:<worker_id>       -> WorkerInfo fields + "address"
    gridllm:scheduler:<scheduler_id> -> {"scheduler_id", "address", "model", "block_size",
                                         "worker_ids", "num_requests_running",
                                         "num_requests_waiting", "kv_blocks_total",
                                         "kv_blocks_free"}
Block-state mirror per worker (written by the scheduler that drives it):
    gridllm:kv:<worker_id>:cached  HASH str(block_hash)
                                        -> "<block_id>:<version>:<t0>,<t1>,...[:<parent>]"
    gridllm:kv:<worker_id>:state   HASH num_blocks, num_free_blocks, num_running,
                                        num_waiting, block_size, instance_id, scheduler_id
    gridllm:kv:<worker_id>:tables  HASH req_id -> "<b0>,<b1>,..."
KV events of every scheduler (gridllm.common.kv_events), one stack-wide log:
    gridllm:{kv-events}      STREAM, entry id "0-<sequence number>", field "e" -> the event
    gridllm:{kv-events}:seq  the last sequence number handed out
Block hashes are gridllm.common.prefix_hash chains, so a router can test prefix overlap
with HMGET on the cached hash. ``version`` is the block's allocation count
(gridllm.common.block_versions) when its KV was computed; ``parent`` the hash of the block
before it (absent when unknown).
"""

from __future__ import annotations

PREFIX = "gridllm"
WORKER_PATTERN = f"{PREFIX}:worker:*"
SCHEDULER_PATTERN = f"{PREFIX}:scheduler:*"
KV_CACHED_PATTERN = f"{PREFIX}:kv:*:cached"
# Hash-tagged: the publishing script touches both keys, which must share a cluster slot.
KV_EVENTS_STREAM = f"{PREFIX}:{{kv-events}}"
KV_EVENTS_SEQ = f"{PREFIX}:{{kv-events}}:seq"


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


def worker_of_cached_key(key: str | bytes) -> str:
    """The worker id in a ``kv_cached_key``."""
    if isinstance(key, bytes):
        key = key.decode()
    return key[len(f"{PREFIX}:kv:"):-len(":cached")]


def encode_cached_block(block_id: int, version: int, token_ids: tuple[int, ...] | list[int],
                        parent_hash: int | None = None) -> str:
    value = f"{block_id}:{version}:{','.join(map(str, token_ids))}"
    return value if parent_hash is None else f"{value}:{parent_hash}"


def decode_cached_block(value: str | bytes) -> tuple[int, int, tuple[int, ...]]:
    """Returns:
        (block id, version, token ids).
    """
    return decode_cached_entry(value)[:3]  # type: ignore[return-value]


def decode_cached_entry(value: str | bytes
                        ) -> tuple[int, int, tuple[int, ...], int | None]:
    """Returns:
        (block id, version, token ids, parent hash or None).
    """
    if isinstance(value, bytes):
        value = value.decode()
    block_id, version, tokens, *parent = value.split(":", 3)
    return (int(block_id), int(version), tuple(int(t) for t in tokens.split(",") if t),
            int(parent[0]) if parent else None)
