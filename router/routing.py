"""Which scheduler gets a request: the pool of scheduler links and the routing policy.

With one scheduler there is nothing to choose. With several, a policy
(gridllm.common.routing_policy; cache-aware by default) weighs each scheduler's prefix
overlap with the prompt (the most any of its workers caches, from the prefix index the KV
event log feeds, router.kv_index) against its load (polled with GetStats).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gridllm.common.grpc_utils import channel_options
from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys
from gridllm.common.routing_policy import CacheAwarePolicy, Candidate, RoutingPolicy
from gridllm.common.tls import SCHEDULER_SERVER_NAME, TlsOptions, internal_channel
from gridllm.v1 import generate_pb2, scheduler_pb2, scheduler_pb2_grpc
from router.kv_index import KvIndexFollower, RecentRoutes
from router.scheduler_session import SchedulerSession

logger = logging.getLogger(__name__)

# Only the first blocks of a prompt are looked up: the prefix is what gets shared.
_MAX_LOOKUP_BLOCKS = 64


class NoSchedulerError(TimeoutError):
    """No scheduler with a live worker answered (within the wait allowed)."""


@dataclass
class SchedulerLink:
    """One scheduler: its channel, what it serves, and how loaded it is."""

    address: str
    channel: grpc.aio.Channel
    stub: scheduler_pb2_grpc.SchedulerStub
    info: scheduler_pb2.SchedulerInfo | None = None
    is_alive: bool = False
    # Requests this router has in flight there (exact, updated per request).
    num_inflight: int = 0
    worker_ids: list[str] = field(default_factory=list)
    last_ok: float = 0.0
    # From the last GetStats (all routers' requests): the load a routing policy weighs.
    num_running: int = 0
    num_waiting: int = 0
    num_queued_tokens: int = 0
    kv_usage: float = 0.0
    # GetStats polls sent, and the one whose reply the figures above come from. Its
    # snapshot may still count this router's requests sent before it that have ended or
    # got their first token since it went out: those are taken off the reported load, so a
    # request that just ended does not make its scheduler (and the prefix it left cached
    # there) look busy until the next poll.
    polls_sent: int = 0
    stats_poll: int = 0
    ended_since_stats: int = 0
    prefilled_since_stats: int = 0
    # Those events since the poll went out: (polls sent before the request, polls sent
    # before the event, requests ended, prompt tokens that got their first token).
    exits_since_stats: list[tuple[int, int, int, int]] = field(default_factory=list)
    # This router's requests there that have no first token yet, oldest first: their
    # uncached prompt tokens (exact, where the reported queue lags), their prompt tokens
    # and the polls sent before them.
    routed_tokens: collections.deque[tuple[int, int, int]] = field(
        default_factory=collections.deque)
    # The Session stream this router's requests share (None until the first one; replaced
    # after it ends).
    session: SchedulerSession | None = None

    @property
    def supports_session(self) -> bool:
        return self.info is not None and self.info.supports_session

    def open_session(self) -> SchedulerSession:
        """The link's Session stream, opened now if it has none that is up."""
        if self.session is None or not self.session.is_open:
            self.session = SchedulerSession(self.stub, self.address)
        return self.session

    def candidate(self, num_overlap_blocks: int) -> Candidate:
        ended = self.ended_since_stats
        running = max(self.num_running - ended, 0)
        waiting = max(self.num_waiting - max(ended - self.num_running, 0), 0)
        queued = max(self.num_queued_tokens - self.prefilled_since_stats, 0)
        return Candidate(self.address, num_overlap_blocks, running, waiting,
                         max(queued, sum(entry[0] for entry in self.routed_tokens)),
                         self.kv_usage, self.num_inflight)

    def routed(self, num_uncached: int, num_prompt_tokens: int) -> None:
        """One request was routed here (its first token comes with ``prefilled``)."""
        self.routed_tokens.append((num_uncached, num_prompt_tokens, self.polls_sent))

    def prefilled(self) -> None:
        """One request routed here got its first token (or ended): its prompt no longer
        waits. Requests are taken oldest first, which the sums do not mind."""
        if self.routed_tokens:
            _, num_prompt_tokens, polls_before = self.routed_tokens.popleft()
            self._exit(polls_before, 0, num_prompt_tokens)

    def admit(self) -> int:
        """One of this router's requests is sent here; returns the polls sent before it
        (for ``release``)."""
        self.num_inflight += 1
        return self.polls_sent

    def release(self, polls_before: int) -> None:
        """That request ended (``polls_before`` from its ``admit``)."""
        self.num_inflight -= 1
        self._exit(polls_before, 1, 0)

    def _exit(self, polls_before: int, num_ended: int, num_prefilled_tokens: int) -> None:
        self.exits_since_stats.append((polls_before, self.polls_sent, num_ended,
                                       num_prefilled_tokens))
        if polls_before < self.stats_poll:
            self.ended_since_stats += num_ended
            self.prefilled_since_stats += num_prefilled_tokens

    def begin_poll(self) -> int:
        """A GetStats poll is sent: its number, for ``note_load``."""
        self.polls_sent += 1
        return self.polls_sent


class PrefixIndex:
    """Which worker caches how much of a prompt.

    Answers from the index the KV event log feeds (``follower``) once it holds a state,
    and keeps answering from its last state while Redis is unreachable. Without one, reads
    the per-worker hash sets the schedulers mirror to Redis
    (``RedisKeys.kv_cached_key(w)``, fields ``str(block_hash)``) with HMGET.

    Args:
        redis_client: a ``redis.asyncio.Redis`` (None: no cache affinity).
        follower: the event-fed index, or None.
        keys: the deployment's Redis keys (also those of its scheduler registry).
    """

    def __init__(self, redis_client: Any | None, follower: KvIndexFollower | None = None,
                 keys: RedisKeys = DEFAULT_KEYS):
        self.redis = redis_client
        self.follower = follower
        self.keys = keys

    async def overlap(self, worker_ids: Sequence[str], hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> number of leading ``hashes`` cached on it (empty on Redis trouble)."""
        if not hashes or not worker_ids:
            return {}
        if self.follower is not None and self.follower.index.has_state:
            return self.follower.index.overlap(worker_ids, hashes)
        if self.redis is None:
            return {}
        fields = [str(h) for h in hashes]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for worker_id in worker_ids:
                    pipe.hmget(self.keys.kv_cached_key(worker_id), fields)
                replies = await asyncio.wait_for(pipe.execute(), timeout=0.5)
        except Exception as exc:  # noqa: BLE001 - routing must not fail on Redis trouble
            logger.warning("prefix index unavailable (%s): routing by load only", exc)
            return {}
        result = {}
        for worker_id, values in zip(worker_ids, replies, strict=True):
            num = 0
            for value in values:  # chained hashes: only a leading run is a reusable prefix
                if value is None:
                    break
                num += 1
            result[worker_id] = num
        return result


class SchedulerPool:
    """Links to the schedulers, kept fresh by a background poll, and the pick policy.

    Args:
        addresses: ``host:port`` of each scheduler; empty: discover them from the registry
            in Redis (the deployment's ``scheduler:*`` entries, which expire with their
            scheduler).
        prefix_index: where prefix overlap is read (affinity only with several schedulers);
            its Redis is also the registry read for discovery.
        poll_interval_s: how often each scheduler's stats (load, liveness) are refreshed.
        policy: the routing policy (gridllm.common.routing_policy; default cache-aware).
        tls: the router's certificate and the deployment's CA (mutual TLS to the
            schedulers); None or disabled: plaintext.
    """

    def __init__(self, addresses: Sequence[str], prefix_index: PrefixIndex | None = None,
                 poll_interval_s: float = 0.5, policy: RoutingPolicy | None = None,
                 tls: TlsOptions | None = None):
        self.tls = tls
        self.is_discovering = not addresses
        if self.is_discovering and (prefix_index is None or prefix_index.redis is None):
            raise ValueError("at least one scheduler address is needed (--scheduler), or "
                             "--redis-url to discover the schedulers.")
        self.links: list[SchedulerLink] = []
        for address in addresses:
            self._add_link(address)
        self.prefix_index = prefix_index
        self.poll_interval_s = poll_interval_s
        self.policy = policy or CacheAwarePolicy()
        self.recent = RecentRoutes()
        # Whether any scheduler is alive; ``availability_changed`` is set when that flips.
        self.is_available = False
        self.availability_changed = asyncio.Event()
        self._changed = asyncio.Event()
        self._poller: asyncio.Task | None = None
        # The refresh of every link in progress; concurrent callers share it.
        self._refreshing: asyncio.Future | None = None

    def _add_link(self, address: str) -> None:
        channel = internal_channel(address, self.tls, SCHEDULER_SERVER_NAME, channel_options())
        self.links.append(SchedulerLink(address, channel,
                                        scheduler_pb2_grpc.SchedulerStub(channel)))

    async def discover(self) -> None:
        """Link every scheduler registered in Redis that is not linked yet."""
        assert self.prefix_index is not None and self.prefix_index.redis is not None
        redis = self.prefix_index.redis
        try:
            pattern = self.prefix_index.keys.scheduler_pattern
            keys = [k async for k in redis.scan_iter(match=pattern)]
            values = await redis.mget(keys) if keys else []
        except Exception as exc:  # noqa: BLE001 - keep routing to the known schedulers
            logger.warning("scheduler registry unavailable: %s", exc)
            return
        known = {link.address for link in self.links}
        for value in values:
            address = json.loads(value).get("address") if value else None
            if address and address not in known:
                logger.info("discovered scheduler %s", address)
                self._add_link(address)
                known.add(address)

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        for task in (self._poller, self._refreshing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # Cancelled tasks hold their frames, which hold this pool: no cycle left behind.
        self._poller = self._refreshing = None
        for link in self.links:
            if link.session is not None:
                await link.session.close()
                link.session = None
            await link.channel.close()

    def alive(self) -> list[SchedulerLink]:
        return [link for link in self.links if link.is_alive]

    def any_info(self) -> scheduler_pb2.SchedulerInfo | None:
        for link in self.alive():
            if link.info is not None:
                return link.info
        return None

    def mark_down(self, link: SchedulerLink) -> None:
        """Called when a call to ``link`` failed: skip it until a poll succeeds again."""
        if link.is_alive:
            logger.warning("scheduler %s is unreachable; routing around it", link.address)
        link.is_alive = False
        self._note_availability()

    def _note_availability(self) -> None:
        is_available = any(link.is_alive for link in self.links)
        if is_available != self.is_available:
            self.is_available = is_available
            self.availability_changed.set()

    async def _poll_forever(self) -> None:
        while True:
            await self.refresh_all()
            await asyncio.sleep(self.poll_interval_s)

    async def refresh_all(self) -> None:
        """Discover (when discovering) and refresh every link now; concurrent callers share
        one round."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_all())
        await asyncio.shield(self._refreshing)

    async def _refresh_all(self) -> None:
        if self.is_discovering:
            await self.discover()
        await asyncio.gather(*(self.refresh(link) for link in self.links))

    async def refresh(self, link: SchedulerLink) -> None:
        """GetInfo + GetStats: marks the link alive (a scheduler with workers) or down."""
        try:
            info = await link.stub.GetInfo(scheduler_pb2.GetSchedulerInfoRequest(), timeout=1.0)
            poll = link.begin_poll()
            stats = await link.stub.GetStats(generate_pb2.GetServerStatsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            self.mark_down(link)
            return
        was_alive = link.is_alive
        # A scheduler without workers knows no model limits yet: not usable.
        link.is_alive = info.num_workers > 0 and info.vocab_size > 0
        link.info = info if info.vocab_size > 0 else link.info
        link.worker_ids = [w.worker_id for w in stats.workers if w.is_alive]
        note_load(link, stats, poll)
        link.last_ok = time.monotonic()
        if link.is_alive and not was_alive:
            logger.info("scheduler %s is serving (%d workers)", link.address, info.num_workers)
            self._changed.set()
        elif was_alive and not link.is_alive:
            logger.warning("scheduler %s has no live worker", link.address)
        self._note_availability()

    async def wait_alive(self, timeout_s: float) -> list[SchedulerLink]:
        """The alive links, waiting up to ``timeout_s`` for one (TimeoutError if none).

        With none alive, every link is asked again first: ``timeout_s=0`` answers after one
        round of checks (milliseconds for a dead scheduler, at most a call timeout).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.alive()
            if alive:
                return alive
            self._changed.clear()
            # Poll actively too: the background poll may be sleeping.
            await self.refresh_all()
            if self.alive():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoSchedulerError(
                    "no scheduler with a live worker is reachable" if timeout_s <= 0 else
                    f"no scheduler with a live worker came back within {timeout_s:.1f}s")
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass

    async def pick(self, token_ids: Sequence[int], timeout_s: float,
                   cache_salt: str | None = None) -> SchedulerLink:
        """The scheduler for a prompt (waits up to ``timeout_s`` for one to be alive)."""
        alive = await self.wait_alive(timeout_s)
        if len(alive) == 1:
            # Nothing to choose; noted all the same, so each first token ends its own entry.
            alive[0].routed(len(token_ids), len(token_ids))
            return alive[0]
        overlaps: dict[str, int] = {}
        hashes: list[int] = []
        block_size = alive[0].info.block_size if alive[0].info is not None else 0
        if self.prefix_index is not None and block_size:
            hashes = prompt_block_hashes(token_ids, block_size, cache_salt, _MAX_LOOKUP_BLOCKS)
            worker_ids = [w for link in alive for w in link.worker_ids]
            per_worker = await self.prefix_index.overlap(worker_ids, hashes)
            overlaps = {link.address: max((per_worker.get(w, 0) for w in link.worker_ids),
                                          default=0) for link in alive}
        return choose_link(alive, overlaps, self.policy, token_ids, block_size, hashes,
                           self.recent)

    def note_computed(self, link: SchedulerLink, token_ids: Sequence[int],
                      cache_salt: str | None = None) -> None:
        """A request routed to ``link`` finished: its blocks are cached there from now, and
        the event log reports them a little later; until then this router's recent routes
        send the prefix after it (however long the request itself took)."""
        block_size = link.info.block_size if link.info is not None else 0
        if block_size and self.prefix_index is not None:
            self.recent.note(link.address, prompt_block_hashes(
                token_ids, block_size, cache_salt, _MAX_LOOKUP_BLOCKS))


def choose_link(alive: Sequence[SchedulerLink], overlaps: dict[str, int],
                policy: RoutingPolicy, token_ids: Sequence[int], block_size: int,
                hashes: Sequence[int], recent: RecentRoutes) -> SchedulerLink:
    """The policy's pick among ``alive``, noted as routed there (pure; the cluster
    simulator calls it too).

    Args:
        overlaps: address -> prompt blocks its workers cache (from the prefix index); the
            recent routes of this router add what is not in the index yet.
    """
    target, depth = recent.overlap(hashes)
    if target is not None:
        overlaps = {**overlaps, target: max(overlaps.get(target, 0), depth)}
    candidates = [link.candidate(overlaps.get(link.address, 0)) for link in alive]
    index = policy.choose(candidates, len(token_ids), max(block_size, 1))
    link = alive[index]
    if token_ids:
        # Prefill work sent there: what its cache does not cover.
        link.routed(max(len(token_ids) - candidates[index].num_overlap_blocks * block_size, 0),
                    len(token_ids))
    if hashes:
        recent.note(link.address, hashes)
    return link


def note_load(link: SchedulerLink, stats: generate_pb2.GetServerStatsResponse,
              poll: int) -> None:
    """The load a policy weighs, from a scheduler's GetStats (the reply to ``poll``, a
    number from ``link.begin_poll()``; an older poll's late reply is ignored)."""
    if poll < link.stats_poll:
        return
    link.stats_poll = poll
    # Events from before the poll went out are not in its snapshot; later ones of requests
    # sent before it may be (ended while the poll was under way, say), and are taken off.
    exits = link.exits_since_stats = [e for e in link.exits_since_stats if e[1] >= poll]
    link.ended_since_stats = sum(e[2] for e in exits if e[0] < poll)
    link.prefilled_since_stats = sum(e[3] for e in exits if e[0] < poll)
    workers = [w for w in stats.workers if w.is_alive]
    link.num_running = stats.num_requests_running
    link.num_waiting = stats.num_requests_waiting
    link.num_queued_tokens = sum(w.num_queued_tokens for w in workers)
    num_total = sum(w.kv_blocks_total for w in workers)
    link.kv_usage = (1.0 - sum(w.kv_blocks_free for w in workers) / num_total
                     if num_total else 0.0)
