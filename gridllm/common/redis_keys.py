"""Redis key layout shared by the router, scheduler and workers.

Every key lives under one deployment's namespace, ``gridllm:<deployment>:``, so several
stacks can share one Redis without seeing each other's workers, schedulers or caches. Every
key is built through ``RedisKeys``; nothing else spells a key.

Registry (JSON values, refreshed with a TTL so a dead process disappears):
    gridllm:<d>:worker:<worker_id>       -> WorkerInfo fields + "address"
    gridllm:<d>:scheduler:<scheduler_id> -> {"scheduler_id", "address", "model", "block_size",
                                             "worker_ids", "num_requests_running",
                                             "num_requests_waiting", "kv_blocks_total",
                                             "kv_blocks_free"}
Block-state mirror per worker (written by the scheduler that drives it):
    gridllm:<d>:kv:<worker_id>:cached  HASH str(block_hash)
                                        -> "<block_id>:<version>:<t0>,<t1>,...[:<parent>]"
    gridllm:<d>:kv:<worker_id>:state   HASH num_blocks, num_free_blocks, num_running,
                                        num_waiting, block_size, instance_id, scheduler_id
    gridllm:<d>:kv:<worker_id>:tables  HASH req_id -> "<b0>,<b1>,..."
KV events of every scheduler of the deployment (gridllm.common.kv_events), one log:
    gridllm:<d>:{kv-events}      STREAM, entry id "0-<sequence number>", field "e" -> the event
    gridllm:<d>:{kv-events}:seq  the last sequence number handed out
Block hashes are gridllm.common.prefix_hash chains, so a router can test prefix overlap
with HMGET on the cached hash. ``version`` is the block's allocation count
(gridllm.common.block_versions) when its KV was computed; ``parent`` the hash of the block
before it (absent when unknown). The token ids of a cached block stay in the mirror: a
restarted scheduler checks every restored prefix hit against them (a 64-bit hash alone could
collide), and the KV events carry them to external routers. Redis therefore holds prompt
content and must be protected like the API (password or ACL user, TLS, its own network).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "gridllm"
DEFAULT_DEPLOYMENT = "default"
# Letters, digits, '.', '_' and '-': no ':' (the separator), no glob or hash-tag characters.
_DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_deployment(name: str, field_name: str = "deployment") -> str:
    """``name`` if it can name a deployment, else ValueError naming ``field_name``."""
    if not isinstance(name, str) or not _DEPLOYMENT_RE.match(name):
        raise ValueError(f"{field_name} must be 1-64 letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), got {name!r}.")
    return name


@dataclass(frozen=True)
class RedisKeys:
    """The keys of one deployment.

    Args:
        deployment: the namespace (``--deployment``); stacks sharing a Redis need distinct ones.
    """

    deployment: str = DEFAULT_DEPLOYMENT

    def __post_init__(self) -> None:
        check_deployment(self.deployment)

    @property
    def prefix(self) -> str:
        return f"{ROOT}:{self.deployment}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    @property
    def scheduler_pattern(self) -> str:
        return f"{self.prefix}:scheduler:*"

    @property
    def kv_cached_pattern(self) -> str:
        return f"{self.prefix}:kv:*:cached"

    # Hash-tagged: the publishing script touches both keys, which must share a cluster slot.
    @property
    def kv_events_stream(self) -> str:
        return f"{self.prefix}:{{kv-events}}"

    @property
    def kv_events_seq(self) -> str:
        return f"{self.prefix}:{{kv-events}}:seq"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def scheduler_key(self, scheduler_id: str) -> str:
        return f"{self.prefix}:scheduler:{scheduler_id}"

    def kv_cached_key(self, worker_id: str) -> str:
        return f"{self.prefix}:kv:{worker_id}:cached"

    def kv_state_key(self, worker_id: str) -> str:
        return f"{self.prefix}:kv:{worker_id}:state"

    def kv_tables_key(self, worker_id: str) -> str:
        return f"{self.prefix}:kv:{worker_id}:tables"

    def worker_of_cached_key(self, key: str | bytes) -> str:
        """The worker id in a ``kv_cached_key``."""
        if isinstance(key, bytes):
            key = key.decode()
        return key[len(f"{self.prefix}:kv:"):-len(":cached")]


DEFAULT_KEYS = RedisKeys()


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
