"""Mirrors the scheduler's block state to Redis behind the step loop, and restores it.

After each step the step loop records what changed, synchronously and without I/O; a
background task writes the records in one pipelined round trip, so a slow Redis delays
the mirror, never a step. After Redis was unreachable, or lost its data (a restart without
persistence, noticed by the heartbeat), each worker's whole block state is written again.
A prefix-cache entry is recorded only after the step that computed its KV, with its block
version (gridllm.common.block_versions): after a scheduler
restart, entries whose block was overwritten since are recognised and dropped.

A model with several KV groups (scheduler_svc/block_manager.py) keys the cached entries of
the groups after the first by ``"<group>:<hash>"`` and writes a request's tables as the
groups' id lists joined by ``;``. KV events (for routers) carry the first group only.

The same net changes go out as KV events (scheduler_svc.kv_events) in the same pipeline: a
worker's first flush after it is linked, and any full re-sync, start with AllBlocksCleared
and store every cached block; a worker whose link is gone ends with AllBlocksCleared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from gridllm.common import redis_keys
from gridllm.common.config import HEARTBEAT_TTL_S
from gridllm.common.contract import RequestUpdate, SchedulerOutput
from gridllm.common.grpc_utils import stop_tasks, wait_or_stop
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.kv_events import CachedBlock, KvEventPublisher

logger = logging.getLogger(__name__)

# A worker's mirror expires this many heartbeat TTLs after its last write.
_MIRROR_EXPIRY_TTLS = 10


class _Tracked:
    """One worker's block manager and the changes not written yet."""

    def __init__(self, block_manager: BlockManager, versions: list[int],
                 stats: Callable[[], dict[str, Any]]):
        self.block_manager = block_manager
        self.versions = versions
        self.stats = stats
        # block hash -> (block id, version, token ids, parent hash), or None to delete it.
        self.cached: dict[int, CachedBlock | None] = {}
        # The same for the KV groups after the first, keyed by (group, block hash).
        self.group_cached: dict[tuple[int, int], CachedBlock | None] = {}
        # req_id -> "b0,b1,..." or None to delete it.
        self.tables: dict[str, str | None] = {}
        self.is_dirty = True
        # The worker's link is gone: write what is pending, then forget it.
        self.is_retired = False
        # Redis may have lost what was written: write the whole state, not the changes.
        self.needs_full_sync = False
        # KV events: the next flush clears the worker and stores its whole cache (a newly
        # linked worker; after a full sync too).
        self.needs_event_rebuild = True


class RedisMirror:
    """Block state of every worker this scheduler drives, mirrored to Redis.

    Args:
        redis: a ``redis.asyncio`` client, or None to mirror nothing.
        scheduler_id: this scheduler's id (written next to each worker's state).
        registry: returns this scheduler's registry entry (JSON-able) for the heartbeat.
        ttl: seconds the registry entry outlives the last heartbeat.
        kv_events_max_len: KV events are published to a log of about this many newest
            events; 0 publishes none.
        keys: the deployment's Redis keys.
    """

    def __init__(self, redis, scheduler_id: str,
                 registry: Callable[[], dict[str, Any]] | None = None,
                 ttl: float = HEARTBEAT_TTL_S, kv_events_max_len: int = 100_000,
                 keys: RedisKeys = DEFAULT_KEYS):
        self.redis = redis
        self.keys = keys
        self.scheduler_id = scheduler_id
        self.registry = registry
        self.ttl = ttl
        self.events = (KvEventPublisher(redis, scheduler_id, kv_events_max_len, keys)
                       if redis is not None and kv_events_max_len > 0 else None)
        self._tracked: dict[str, _Tracked] = {}
        self._wakeup = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._beat_now = asyncio.Event()
        self._is_closing = False
        self._tasks: list[asyncio.Task] = []
        self.num_flushes = 0
        # When the oldest change not yet written was recorded (time.monotonic()), and who
        # hears how long it waited once written (the metrics' mirror lag).
        self._oldest_change: float | None = None
        self.on_flush: Callable[[float], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    # ----------------------------------------------------------------- step loop side
    def track(self, worker_id: str, block_manager: BlockManager, versions: list[int],
              stats: Callable[[], dict[str, Any]]) -> None:
        """Mirror a worker's block manager (call after restore())."""
        self._tracked[worker_id] = _Tracked(block_manager, versions, stats)
        self._wakeup.set()

    def untrack(self, worker_id: str) -> None:
        """The worker's link is gone: write what is pending, then stop mirroring it.

        Prefix-cache entries registered since the last completed step are dropped: the
        step that would have computed their KV may never have run.
        """
        tracked = self._tracked.get(worker_id)
        if tracked is None:
            return
        _unconfirmed, removed = tracked.block_manager.drain_events()
        for block_hash in removed:
            tracked.cached[block_hash] = None
        _unconfirmed_groups, removed_groups = tracked.block_manager.drain_group_events()
        for key in removed_groups:
            tracked.group_cached[key] = None
        tracked.is_retired = tracked.is_dirty = True
        self._wakeup.set()

    def note_step(self, worker_id: str, output: SchedulerOutput,
                  updates: list[RequestUpdate]) -> None:
        """Record what a completed step changed; no I/O."""
        tracked = self._tracked.get(worker_id)
        if tracked is None or tracked.is_retired or not self.enabled:
            return
        bm = tracked.block_manager
        stored, removed = bm.drain_events()
        # Removals first: a hash evicted and stored again within the step ends stored.
        for block_hash in (*removed, *stored):
            entry = bm.cached_entry(block_hash)
            if entry is None:
                tracked.cached[block_hash] = None
            else:
                block_id, token_ids = entry
                tracked.cached[block_hash] = (block_id, tracked.versions[block_id], token_ids,
                                              bm.cached_parent(block_hash))
        stored_groups, removed_groups = bm.drain_group_events()
        for group, block_hash in (*removed_groups, *stored_groups):
            entry = bm.cached_entry(block_hash, group)
            tracked.group_cached[group, block_hash] = None if entry is None else (
                entry[0], tracked.versions[entry[0]], entry[1],
                bm.cached_parent(block_hash, group))
        req_ids = {r.req_id for r in output.scheduled_new_reqs}
        req_ids.update(r.req_id for r in output.scheduled_cached_reqs if r.new_block_ids)
        req_ids.update(output.finished_req_ids)
        req_ids.update(u.req_id for u in updates if u.finished)
        for req_id in req_ids:
            tracked.tables[req_id] = _table_text(bm, req_id)
        tracked.is_dirty = True
        if self._oldest_change is None:
            self._oldest_change = time.monotonic()
        self._wakeup.set()

    # ----------------------------------------------------------------- background
    def start(self) -> None:
        if self.enabled:
            self._tasks = [asyncio.create_task(self._flush_loop(), name="redis-mirror"),
                           asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat")]

    async def _flush_loop(self) -> None:
        while not self._is_closing:
            await self._wakeup.wait()
            if self._is_closing:
                return
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - Redis trouble must not stop serving
                logger.warning("mirroring block state to Redis failed: %s", exc)
                await asyncio.sleep(0.5)
                self._wakeup.set()

    async def flush(self) -> None:
        """Write every recorded change in one pipelined round trip."""
        if not self.enabled:
            return
        async with self._flush_lock:
            pipe = self.redis.pipeline(transaction=False)
            taken = []
            for worker_id, tracked in list(self._tracked.items()):
                if tracked.is_dirty:
                    taken.append((worker_id, tracked, self._take(pipe, worker_id, tracked)))
            if not taken:
                return
            changed_at, self._oldest_change = self._oldest_change, None
            try:
                await pipe.execute()
            except Exception:
                if changed_at is not None:
                    self._oldest_change = min(changed_at, self._oldest_change or changed_at)
                for _, tracked, (cached, group_cached, tables) in taken:  # for the retry
                    tracked.cached = {**cached, **tracked.cached}
                    tracked.group_cached = {**group_cached, **tracked.group_cached}
                    tracked.tables = {**tables, **tracked.tables}
                    # Redis may come back empty (restarted): then only the whole state helps.
                    tracked.needs_full_sync = tracked.is_dirty = True
                    tracked.needs_event_rebuild = True
                raise
            for worker_id, tracked, _ in taken:
                if tracked.is_retired and self._tracked.get(worker_id) is tracked:
                    del self._tracked[worker_id]
            self.num_flushes += 1
            if changed_at is not None and self.on_flush is not None:
                self.on_flush(time.monotonic() - changed_at)

    def _take(self, pipe, worker_id: str, tracked: _Tracked):
        cached, tracked.cached = tracked.cached, {}
        group_cached, tracked.group_cached = tracked.group_cached, {}
        tables, tracked.tables = tracked.tables, {}
        tracked.is_dirty = False
        cached_key = self.keys.kv_cached_key(worker_id)
        tables_key = self.keys.kv_tables_key(worker_id)
        bm = tracked.block_manager
        is_full = tracked.needs_full_sync and not tracked.is_retired
        is_rebuild = (is_full or tracked.needs_event_rebuild) and not tracked.is_retired
        tracked.needs_event_rebuild = False
        whole = _cached_state(bm, tracked.versions) if is_rebuild else {}
        if is_full:
            tracked.needs_full_sync = False
            pipe.delete(cached_key, tables_key)
            cached = whole
            group_cached = _group_cached_state(bm, tracked.versions)
            tables = {r: _table_text(bm, r) for r in bm.block_tables()}
        if self.events is not None:
            events = self.events.changes(worker_id, bm.block_size,
                                         whole if is_rebuild else cached, is_rebuild)
            if tracked.is_retired:
                events.append(self.events.cleared(worker_id))
            self.events.append(pipe, events)
        to_set = {str(h): redis_keys.encode_cached_block(*v) for h, v in cached.items()
                  if v is not None}
        to_delete = [str(h) for h, v in cached.items() if v is None]
        to_set.update({f"{g}:{h}": redis_keys.encode_cached_block(*v)
                       for (g, h), v in group_cached.items() if v is not None})
        to_delete += [f"{g}:{h}" for (g, h), v in group_cached.items() if v is None]
        if to_set:
            pipe.hset(cached_key, mapping=to_set)
        if to_delete:
            pipe.hdel(cached_key, *to_delete)
        table_set = {r: v for r, v in tables.items() if v is not None}
        table_delete = [r for r, v in tables.items() if v is None]
        if table_set:
            pipe.hset(tables_key, mapping=table_set)
        if table_delete:
            pipe.hdel(tables_key, *table_delete)
        state = {"num_blocks": bm.num_blocks, "num_free_blocks": bm.num_free_blocks,
                 "block_size": bm.block_size, "scheduler_id": self.scheduler_id,
                 "updated_at": time.time(), **tracked.stats()}
        pipe.hset(self.keys.kv_state_key(worker_id), mapping=state)
        # The mirror of a worker nobody drives any more (it died) expires; the heartbeat
        # keeps a live one.
        expiry_ms = int(self.ttl * _MIRROR_EXPIRY_TTLS * 1000)
        for key in (cached_key, tables_key, self.keys.kv_state_key(worker_id)):
            pipe.pexpire(key, expiry_ms)
        return cached, group_cached, tables

    async def _heartbeat_loop(self) -> None:
        while not self._is_closing:
            self._beat_now.clear()
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001
                logger.warning("scheduler heartbeat to Redis failed: %s", exc)
            await wait_or_stop(self._beat_now, self.ttl / 3)

    def beat_soon(self) -> None:
        """Refresh the registry entry now (a worker joined or left)."""
        self._beat_now.set()

    async def beat(self) -> None:
        """Refresh this scheduler's registry entry (and every worker's state)."""
        if not self.enabled or self.registry is None:
            return
        tracked = list(self._tracked.items())
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.scheduler_key(self.scheduler_id), json.dumps(self.registry()),
                 px=int(self.ttl * 1000))
        for worker_id, _ in tracked:
            pipe.exists(self.keys.kv_state_key(worker_id))
        replies = await pipe.execute()
        for (worker_id, entry), exists in zip(tracked, replies[1:], strict=True):
            if not exists and not entry.is_retired:
                # The state key is written with every flush: Redis lost the mirror.
                logger.info("worker %s: mirror missing in Redis; writing it again", worker_id)
                entry.needs_full_sync = True
            entry.is_dirty = True
        self._wakeup.set()

    # ----------------------------------------------------------------- restore
    async def restore(self, worker_id: str, instance_id: str, block_manager: BlockManager,
                      versions: list[int]) -> int:
        """Rebuild a fresh block manager's prefix cache from Redis.

        Only entries written for the same worker instance whose block version still
        matches the worker's are trusted. Block tables of the old scheduler's requests
        are dropped (those requests ended with it).
        Args:
            versions: the worker's block versions, from the stream handshake.
        Returns:
            The number of cached blocks restored.
        """
        if not self.enabled:
            return 0
        await self.flush()  # entries of this worker's previous link, if any
        state_key = self.keys.kv_state_key(worker_id)
        cached_key = self.keys.kv_cached_key(worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(state_key, "instance_id")
        pipe.hgetall(cached_key)
        stored_instance, raw = await pipe.execute()
        if isinstance(stored_instance, bytes):
            stored_instance = stored_instance.decode()
        # group -> (entries, parents), as BlockManager.restore_cached takes them.
        by_group: dict[int, tuple[dict, dict]] = {}
        if stored_instance == instance_id:
            for key, value in raw.items():
                block_id, version, token_ids, parent = redis_keys.decode_cached_entry(value)
                if not (0 <= block_id < len(versions) and versions[block_id] == version):
                    continue
                group_text, _, hash_text = (key.decode() if isinstance(key, bytes)
                                            else key).rpartition(":")
                entries, parents = by_group.setdefault(int(group_text or 0), ({}, {}))
                entries[int(hash_text)] = (block_id, token_ids)
                if parent is not None:
                    parents[int(hash_text)] = parent
        restored = sum(block_manager.restore_cached(entries, parents, group)
                       for group, (entries, parents) in sorted(by_group.items()))
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.kv_tables_key(worker_id))
        if raw and restored != len(raw):
            # Stale entries would mislead routers; rewrite what was kept.
            pipe.delete(cached_key)
            kept = {str(h): redis_keys.encode_cached_block(*entry)
                    for h, entry in _cached_state(block_manager, versions).items()
                    if entry is not None}
            kept.update({f"{g}:{h}": redis_keys.encode_cached_block(*entry)
                         for (g, h), entry in
                         _group_cached_state(block_manager, versions).items()
                         if entry is not None})
            if kept:
                pipe.hset(cached_key, mapping=kept)
        pipe.hset(state_key, mapping={"instance_id": instance_id,
                                      "scheduler_id": self.scheduler_id})
        await pipe.execute()
        logger.info("worker %s: restored %d of %d mirrored KV blocks", worker_id, restored,
                    len(raw))
        return restored

    async def close(self) -> None:
        """Final flush, remove the registry entry, stop the background tasks."""
        self._is_closing = True
        self._wakeup.set()
        await stop_tasks(self._tasks, self._beat_now)
        self._tasks = []
        if not self.enabled:
            return
        try:
            await self.flush()
            await self.redis.delete(self.keys.scheduler_key(self.scheduler_id))
        except Exception as exc:  # noqa: BLE001
            logger.warning("final Redis flush failed: %s", exc)


def _cached_state(bm: BlockManager, versions: list[int]) -> dict[int, CachedBlock | None]:
    """Every cached block of ``bm`` as the mirror records it."""
    return {h: (block_id, versions[block_id], tokens, bm.cached_parent(h))
            for h, (block_id, tokens) in bm.cached_entries().items()}


def _group_cached_state(bm: BlockManager, versions: list[int]
                        ) -> dict[tuple[int, int], CachedBlock | None]:
    """Every cached block of the KV groups after the first, by (group, hash)."""
    return {(g, h): (block_id, versions[block_id], tokens, bm.cached_parent(h, g))
            for g in range(1, bm.num_groups)
            for h, (block_id, tokens) in bm.cached_entries(g).items()}


def _table_text(bm: BlockManager, req_id: str) -> str | None:
    """A request's block tables as mirrored: ids joined by ``,``, groups by ``;`` (None:
    it holds none)."""
    block_ids = bm.get_block_ids(req_id)
    if not block_ids:
        return None
    tables = [block_ids, *bm.get_group_block_ids(req_id)]
    return ";".join(",".join(map(str, ids)) for ids in tables)
