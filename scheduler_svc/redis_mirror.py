"""Mirrors the scheduler's block state to Redis behind the step loop, and restores it.

The step loop only marks what changed (no await); a background task snapshots the block
managers and writes everything in one pipelined round trip, so a slow Redis delays the
mirror, never a step. After a scheduler restart the prefix-cache index of a worker is read
back, so blocks the worker still holds are prefix-cache hits again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from gridllm import redis_keys
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.output import RequestUpdate, SchedulerOutput

logger = logging.getLogger(__name__)


def restore_cached_blocks(block_manager: BlockManager,
                          entries: dict[int, tuple[int, tuple[int, ...]]]) -> int:
    """Register cached (free) blocks in a fresh block manager.

    Args:
        block_manager: one with every block free and nothing cached.
        entries: block hash -> (block id, its token ids).
    Returns:
        The number of blocks restored (inconsistent entries are skipped).
    """
    restored = 0
    for block_hash, (block_id, token_ids) in entries.items():
        if not 0 <= block_id < block_manager.num_blocks or len(token_ids) != block_manager.block_size:
            continue
        block = block_manager.blocks[block_id]
        if block.block_hash is not None or block.ref_cnt != 0 or block_hash in block_manager.cached_blocks:
            continue
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        block_manager.cached_blocks[block_hash] = block
        # Cached blocks go behind the unhashed ones: evicted last.
        block_manager.free_queue.move_to_end(block_id)
        restored += 1
    return restored


class _Tracked:
    def __init__(self, block_manager: BlockManager, stats: Callable[[], dict[str, Any]]):
        self.block_manager = block_manager
        self.stats = stats
        self.dirty_req_ids: set[str] = set()
        self.is_dirty = True


class RedisMirror:
    """Block state of every worker this scheduler drives, mirrored to Redis.

    Args:
        redis: a ``redis.asyncio`` client, or None to mirror nothing.
        scheduler_id: this scheduler's id (written next to each worker's state).
        registry: returns this scheduler's registry entry (JSON-able) for the heartbeat.
        ttl: seconds the registry entry outlives the last heartbeat.
    """

    def __init__(self, redis, scheduler_id: str,
                 registry: Callable[[], dict[str, Any]] | None = None, ttl: float = 6.0):
        self.redis = redis
        self.scheduler_id = scheduler_id
        self.registry = registry
        self.ttl = ttl
        self._tracked: dict[str, _Tracked] = {}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.num_flushes = 0

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    # ----------------------------------------------------------------- step loop side
    def track(self, worker_id: str, block_manager: BlockManager,
              stats: Callable[[], dict[str, Any]]) -> None:
        self._tracked[worker_id] = _Tracked(block_manager, stats)
        self._wakeup.set()

    def untrack(self, worker_id: str) -> None:
        self._tracked.pop(worker_id, None)

    def note_step(self, worker_id: str, output: SchedulerOutput,
                  updates: list[RequestUpdate]) -> None:
        """Remember what a step changed; never waits."""
        tracked = self._tracked.get(worker_id)
        if tracked is None or not self.enabled:
            return
        dirty = tracked.dirty_req_ids
        dirty.update(r.req_id for r in output.scheduled_new_reqs)
        dirty.update(r.req_id for r in output.scheduled_cached_reqs if r.new_block_ids)
        dirty.update(output.finished_req_ids)
        dirty.update(u.req_id for u in updates if u.finished)
        tracked.is_dirty = True
        self._wakeup.set()

    # ----------------------------------------------------------------- background
    def start(self) -> None:
        if self.enabled:
            self._tasks = [asyncio.create_task(self._flush_loop(), name="redis-mirror"),
                           asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat")]

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - Redis trouble must not stop serving
                logger.warning("mirroring block state to Redis failed: %s", exc)
                for tracked in self._tracked.values():
                    tracked.is_dirty = True
                await asyncio.sleep(0.5)
                self._wakeup.set()

    async def flush(self) -> None:
        """Write every change since the last flush in one pipelined round trip."""
        if not self.enabled:
            return
        pipe = self.redis.pipeline(transaction=False)
        num_commands = 0
        for worker_id, tracked in list(self._tracked.items()):
            if not tracked.is_dirty:
                continue
            num_commands += self._snapshot(pipe, worker_id, tracked)
        if num_commands:
            await pipe.execute()
            self.num_flushes += 1

    def _snapshot(self, pipe, worker_id: str, tracked: _Tracked) -> int:
        # Runs without awaiting: the snapshot is one consistent state of the block manager.
        bm = tracked.block_manager
        tracked.is_dirty = False
        stored, removed = bm.drain_events()
        cached_key = redis_keys.kv_cached_key(worker_id)
        to_set, to_delete = {}, []
        # Look the current state up: a hash may be stored and evicted within one batch.
        for block_hash in set(stored) | set(removed):
            block = bm.cached_blocks.get(block_hash)
            if block is not None and block.token_ids is not None:
                to_set[str(block_hash)] = redis_keys.encode_cached_block(block.block_id,
                                                                         block.token_ids)
            else:
                to_delete.append(str(block_hash))
        n = 0
        if to_set:
            pipe.hset(cached_key, mapping=to_set)
            n += 1
        if to_delete:
            pipe.hdel(cached_key, *to_delete)
            n += 1
        tables_key = redis_keys.kv_tables_key(worker_id)
        tables, gone = {}, []
        for req_id in tracked.dirty_req_ids:
            block_ids = bm.get_block_ids(req_id)
            if block_ids:
                tables[req_id] = ",".join(map(str, block_ids))
            else:
                gone.append(req_id)
        tracked.dirty_req_ids = set()
        if tables:
            pipe.hset(tables_key, mapping=tables)
            n += 1
        if gone:
            pipe.hdel(tables_key, *gone)
            n += 1
        state = {"num_blocks": bm.num_blocks, "num_free_blocks": bm.num_free_blocks,
                 "block_size": bm.block_size, "scheduler_id": self.scheduler_id,
                 "updated_at": time.time(), **tracked.stats()}
        pipe.hset(redis_keys.kv_state_key(worker_id), mapping=state)
        return n + 1

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001
                logger.warning("scheduler heartbeat to Redis failed: %s", exc)
            await asyncio.sleep(self.ttl / 3)

    async def beat(self) -> None:
        """Refresh this scheduler's registry entry (and every worker's state)."""
        if not self.enabled or self.registry is None:
            return
        for tracked in self._tracked.values():
            tracked.is_dirty = True
        await self.redis.set(redis_keys.scheduler_key(self.scheduler_id),
                             json.dumps(self.registry()), px=int(self.ttl * 1000))
        self._wakeup.set()

    # ----------------------------------------------------------------- restore
    async def restore(self, worker_id: str, instance_id: str, block_manager: BlockManager) -> int:
        """Rebuild a fresh block manager's prefix cache from Redis.

        Only an index written for the same worker instance is trusted: a restarted worker
        has an empty KV cache. Block tables of the old scheduler's requests are dropped
        (those requests ended with it).
        Returns:
            The number of cached blocks restored.
        """
        if not self.enabled:
            return 0
        state_key = redis_keys.kv_state_key(worker_id)
        cached_key = redis_keys.kv_cached_key(worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(state_key, "instance_id")
        pipe.hgetall(cached_key)
        stored_instance, raw = await pipe.execute()
        if isinstance(stored_instance, bytes):
            stored_instance = stored_instance.decode()
        restored = 0
        if stored_instance == instance_id and raw:
            entries = {int(k): redis_keys.decode_cached_block(v) for k, v in raw.items()}
            restored = restore_cached_blocks(block_manager, entries)
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(redis_keys.kv_tables_key(worker_id))
        if stored_instance != instance_id:
            pipe.delete(cached_key)
        pipe.hset(state_key, mapping={"instance_id": instance_id,
                                      "scheduler_id": self.scheduler_id})
        await pipe.execute()
        # Entries for blocks that could not be restored would mislead routers: rewrite.
        if raw and restored != len(raw):
            await self.redis.delete(cached_key)
            block_manager.stored_hashes.extend(block_manager.cached_blocks)
        logger.info("worker %s: restored %d cached KV blocks from Redis", worker_id, restored)
        return restored

    async def close(self) -> None:
        """Final flush, remove the registry entry, stop the background tasks."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if not self.enabled:
            return
        try:
            await self.flush()
            await self.redis.delete(redis_keys.scheduler_key(self.scheduler_id))
        except Exception as exc:  # noqa: BLE001
            logger.warning("final Redis flush failed: %s", exc)
