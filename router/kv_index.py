"""The router's prefix index: which worker caches which KV block, fed by the KV event log.

On start (and whenever it lost track: the log was trimmed past it, restarted, or Redis was
unreachable) it loads every worker's mirrored block set from Redis, noting the log's last
sequence number first, then applies the log from there. Events are set operations, so
applying one the snapshot already reflects changes nothing. While Redis is unreachable
the last known state keeps answering (caches change slowly; a wrong guess costs a cache
miss, never a wrong answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from gridllm.common.grpc_utils import stop_tasks, wait_or_stop
from gridllm.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    decode,
    entry_id,
    sequence_of,
)
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys

logger = logging.getLogger(__name__)

# Events read per XREAD, and how long one waits for new events.
_READ_COUNT = 1000
_READ_BLOCK_MS = 250
_RETRY_S = 1.0


class KvIndex:
    """Block hash -> the workers caching it, and the reverse."""

    def __init__(self) -> None:
        self._workers_of: dict[int, set[str]] = {}
        self._blocks_of: dict[str, set[int]] = {}
        # The last event applied (0: none).
        self.last_sequence = 0
        # Whether a snapshot was ever loaded: before that the index knows nothing.
        self.has_state = False

    def apply(self, event: KvEvent) -> None:
        data = event.data
        if isinstance(data, BlockStored):
            self._add(event.worker_id, data.block_hashes)
        elif isinstance(data, BlockRemoved):
            self._remove(event.worker_id, data.block_hashes)
        elif isinstance(data, AllBlocksCleared):
            self._remove(event.worker_id, list(self._blocks_of.get(event.worker_id, ())))
            self._blocks_of.pop(event.worker_id, None)
        if event.sequence_number:
            self.last_sequence = event.sequence_number

    def _add(self, worker_id: str, hashes: Sequence[int]) -> None:
        blocks = self._blocks_of.setdefault(worker_id, set())
        for block_hash in hashes:
            blocks.add(block_hash)
            self._workers_of.setdefault(block_hash, set()).add(worker_id)

    def _remove(self, worker_id: str, hashes: Sequence[int]) -> None:
        blocks = self._blocks_of.get(worker_id)
        if blocks is None:
            return
        for block_hash in hashes:
            blocks.discard(block_hash)
            holders = self._workers_of.get(block_hash)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._workers_of[block_hash]

    def replace(self, blocks_of: dict[str, set[int]], last_sequence: int) -> None:
        """Take a snapshot (worker id -> its cached hashes) as the whole state."""
        self._blocks_of = {w: set(hashes) for w, hashes in blocks_of.items()}
        self._workers_of = {}
        for worker_id, hashes in self._blocks_of.items():
            for block_hash in hashes:
                self._workers_of.setdefault(block_hash, set()).add(worker_id)
        self.last_sequence = last_sequence
        self.has_state = True

    def blocks_of(self, worker_id: str) -> set[int]:
        return set(self._blocks_of.get(worker_id, ()))

    def overlap(self, worker_ids: Sequence[str], hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> how many leading ``hashes`` it caches (chained hashes: only a
        leading run is a reusable prefix). Costs the prefix length, not the fleet size."""
        result = dict.fromkeys(worker_ids, 0)
        remaining = set(worker_ids)
        for depth, block_hash in enumerate(hashes, start=1):
            remaining &= self._workers_of.get(block_hash, set())
            if not remaining:
                break
            for worker_id in remaining:
                result[worker_id] = depth
        return result


class KvIndexFollower:
    """Keeps a KvIndex current from Redis in a background task.

    Args:
        redis: a ``redis.asyncio`` client.
        index: the index to feed (a new one if None).
        keys: the deployment's Redis keys.
    """

    def __init__(self, redis: Any, index: KvIndex | None = None,
                 keys: RedisKeys = DEFAULT_KEYS):
        self.redis = redis
        self.keys = keys
        self.index = index or KvIndex()
        # Whether the index follows the log now (False after trouble, until re-synced).
        self.is_synced = False
        self.num_bootstraps = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="kv-index")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task], self._stopping)
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self.is_synced:
                    await self.bootstrap()
                await self.follow_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last state, retry
                if self.is_synced:
                    logger.warning("KV event log unavailable (%s): routing on the last known "
                                   "cache state", exc)
                self.is_synced = False
                if await wait_or_stop(self._stopping, _RETRY_S):
                    return

    async def bootstrap(self) -> None:
        """Load every worker's mirrored block set, positioned at the log's end."""
        last = await last_sequence(self.redis, self.keys)
        keys = [k async for k in self.redis.scan_iter(match=self.keys.kv_cached_pattern,
                                                      count=1000)]
        blocks_of: dict[str, set[int]] = {}
        if keys:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hkeys(key)
                replies = await pipe.execute()
            for key, fields in zip(keys, replies, strict=True):
                blocks_of[self.keys.worker_of_cached_key(key)] = {int(f) for f in fields}
        self.index.replace(blocks_of, last)
        self.is_synced = True
        self.num_bootstraps += 1
        logger.info("KV index loaded: %d workers, %d blocks, log at %d", len(blocks_of),
                    sum(len(b) for b in blocks_of.values()), last)

    async def follow_once(self) -> int:
        """Apply the events after the index's position (waiting up to a second for some).

        Returns:
            How many were applied. Loses sync (the next round reloads) if the log skipped
            past the index (trimmed) or restarted below it.
        """
        position = self.index.last_sequence
        reply = await self.redis.xread({self.keys.kv_events_stream: entry_id(position)},
                                       count=_READ_COUNT, block=_READ_BLOCK_MS)
        entries = reply[0][1] if reply else []
        if not entries:
            if await last_sequence(self.redis, self.keys) < position:
                logger.warning("KV event log restarted (Redis lost it); reloading the index")
                self.is_synced = False
            return 0
        if sequence_of(entries[0][0]) != position + 1:
            logger.warning("KV event log trimmed past the index (at %d, next %d); reloading",
                           position, sequence_of(entries[0][0]))
            self.is_synced = False
            return 0
        for raw_id, fields in entries:
            self.index.apply(decode(_field(fields), sequence_of(raw_id)))
        return len(entries)


class RecentRoutes:
    """The prompts a router sent where, for a few seconds: the blocks a request is about to
    compute are not in the event log yet, and a burst sharing a new prefix should follow
    its first request instead of spreading before the log catches up.

    Args:
        ttl_s: how long a route counts.
        max_entries: most block hashes remembered (oldest dropped first).
        clock: seconds, monotonic (the cluster simulator passes its own).
    """

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        # block hash -> (target, expiry).
        self._routes: OrderedDict[int, tuple[str, float]] = OrderedDict()

    def note(self, target: str, hashes: Sequence[int]) -> None:
        expiry = self.clock() + self.ttl_s
        for block_hash in hashes:
            self._routes.pop(block_hash, None)
            self._routes[block_hash] = (target, expiry)
        while len(self._routes) > self.max_entries:
            self._routes.popitem(last=False)

    def overlap(self, hashes: Sequence[int]) -> tuple[str | None, int]:
        """The target the longest leading run of ``hashes`` was sent to, and that run."""
        now = self.clock()
        target, depth = None, 0
        for block_hash in hashes:
            route = self._routes.get(block_hash)
            if route is None or route[1] < now or (target is not None and route[0] != target):
                break
            target, depth = route[0], depth + 1
        return target, depth


async def last_sequence(redis: Any, keys: RedisKeys = DEFAULT_KEYS) -> int:
    """The sequence number of the log's newest event (0 if empty or missing)."""
    top = await redis.xrevrange(keys.kv_events_stream, count=1)
    return sequence_of(top[0][0]) if top else 0


async def first_sequence(redis: Any, keys: RedisKeys = DEFAULT_KEYS) -> int:
    """The sequence number of the log's oldest retained event (0 if empty or missing)."""
    bottom = await redis.xrange(keys.kv_events_stream, count=1)
    return sequence_of(bottom[0][0]) if bottom else 0


def _field(fields: dict) -> bytes | str:
    value = fields.get(b"e", fields.get("e"))
    if value is None:
        raise ValueError(f"a KV event log entry without its field 'e': {fields!r}")
    return value
