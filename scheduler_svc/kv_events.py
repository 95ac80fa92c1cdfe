"""Publishes a scheduler's KV events to the stack-wide log (a bounded Redis stream).

The Redis mirror hands over, per worker and per flush, the net change of the prefix cache
since its last flush (what it writes to the mirror anyway); this module turns it into
events and appends them in the mirror's pipeline. A Lua script numbers them from one
counter, so the log's sequence numbers are dense and increasing across every scheduler,
and any router can replay the same log from a number.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from gridllm.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    KvEvent,
    encode,
    stored_chains,
)
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys

# Appends ARGV[2..] (encoded events) to the stream KEYS[1] as entries "0-<n>", n taken from
# the counter KEYS[2], trimming the stream to about ARGV[1] entries. If the counter is gone
# while the stream is not (evicted), it resumes after the stream's last entry.
_APPEND_SCRIPT = """
local n = #ARGV - 1
if n < 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top > 0 then
    local id = top[1][1]
    redis.call('SET', KEYS[2], string.sub(id, string.find(id, '-', 1, true) + 1))
  end
end
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n + 1
for i = 1, n do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. string.format('%d', first + i - 1),
             'e', ARGV[i + 1])
end
return first
"""

# One cached block as the mirror records it: (block id, version, token ids, parent hash).
CachedBlock = tuple[int, int, tuple[int, ...], "int | None"]


class KvEventPublisher:
    """Builds a scheduler's events and appends them to the log in a pipeline.

    Args:
        redis: a ``redis.asyncio`` client (None: events are built, not appended; the
            cluster simulator does so).
        scheduler_id: written into every event.
        max_len: the log keeps about this many newest events (Redis ``MAXLEN ~``).
        keys: the deployment's Redis keys (its log).
    """

    def __init__(self, redis: Any, scheduler_id: str, max_len: int = 100_000,
                 keys: RedisKeys = DEFAULT_KEYS):
        self.keys = keys
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}.")
        self.scheduler_id = scheduler_id
        self.max_len = max_len
        self._script = redis.register_script(_APPEND_SCRIPT) if redis is not None else None
        self.num_published = 0

    def changes(self, worker_id: str, block_size: int,
                cached: dict[int, CachedBlock | None], is_cleared: bool = False
                ) -> list[KvEvent]:
        """Events for one worker: cleared first (if ``is_cleared``), then removals, then
        stores grouped into chains.

        Args:
            cached: block hash -> what is cached there now, or None if it is not.
        """
        now = time.time()
        events = []
        if is_cleared:
            events.append(KvEvent(worker_id, AllBlocksCleared(), self.scheduler_id, now))
        removed = [h for h, entry in cached.items() if entry is None]
        if removed and not is_cleared:
            events.append(KvEvent(worker_id, BlockRemoved(removed), self.scheduler_id, now))
        stored = [(h, entry) for h, entry in cached.items() if entry is not None]
        if stored:
            chains = stored_chains([h for h, _ in stored], [e[3] for _, e in stored],
                                   [e[2] for _, e in stored], block_size)
            events += [KvEvent(worker_id, chain, self.scheduler_id, now) for chain in chains]
        return events

    def cleared(self, worker_id: str) -> KvEvent:
        return KvEvent(worker_id, AllBlocksCleared(), self.scheduler_id, time.time())

    def append(self, pipe: Any, events: Iterable[KvEvent]) -> int:
        """Queue the events' append on ``pipe``; returns how many."""
        encoded = [encode(event) for event in events]
        if encoded and self._script is not None:
            # The pipeline loads the script into Redis (if missing) when it executes.
            pipe.scripts.add(self._script)
            pipe.evalsha(self._script.sha, 2, self.keys.kv_events_stream,
                         self.keys.kv_events_seq, self.max_len, *encoded)
            self.num_published += len(encoded)
        return len(encoded)
