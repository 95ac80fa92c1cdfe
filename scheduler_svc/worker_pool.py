"""The workers one scheduler drives: discovery, links, routing, stats.

Workers are found in Redis (the deployment's ``worker:*`` entries) or given as addresses. Each
linked worker (serving the same model, see model_identity) gets a scheduler core (its own KV
pool) and a WorkerLink running its step loop; a new request goes to the worker holding most
of its prefix, else to the one with most free KV capacity.
The servicer uses the pool through ``add_request``, ``abort``, ``stats`` and ``model_info``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ErrorKind, FinishReason, RequestUpdate, SchedulerOutput
from gridllm.common.convert import model_limits_from_pb, model_limits_to_pb
from gridllm.common.grpc_utils import channel_options, stop_tasks, wait_or_stop
from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys
from gridllm.common.routing_policy import CacheAwarePolicy, Candidate
from gridllm.common.tls import WORKER_SERVER_NAME, TlsOptions, internal_channel
from gridllm.v1 import generate_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from scheduler_svc.model_identity import ModelIdentity
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.worker_link import WorkerLink, WorkerLinkError

logger = logging.getLogger(__name__)


class WorkerPool:
    """Links to the workers and the choice among them.

    Args:
        scheduler_config: budgets, policy and prefix caching of every core (budgets capped
            by each worker's sizing).
        worker_addresses: workers to dial besides those registered in Redis.
        redis: a ``redis.asyncio`` client for discovery, or None.
        mirror: where each core's block state is mirrored (and restored from).
        deliver: receives every step's request updates, with the id of the worker that
            produced them.
        on_serving: awaited with whether any worker is linked, when that changes.
        max_steps_in_flight: per link, see WorkerLink.
        max_migrations: times one request may move to another worker after losing its own.
        lost_after_s: a worker missing from the registry this long with a step pending is
            taken for lost (see WorkerLink).
        worker_group: only registered workers of this group are linked (those given by
            address always are).
        max_workers: link at most this many workers (None: every one found).
        keys: the deployment's Redis keys (whose workers are discovered).
        tls: this scheduler's certificate and the deployment's CA (mutual TLS to the
            workers); None or disabled: plaintext.
        model: the model name workers must serve (None: the first linked worker's).
    """

    def __init__(self, scheduler_config: SchedulerConfig, worker_addresses: list[str],
                 redis: Any, mirror: RedisMirror,
                 deliver: Callable[[list[RequestUpdate], str], None],
                 on_serving: Callable[[bool], Awaitable[None]], max_steps_in_flight: int = 2,
                 max_migrations: int = 3, lost_after_s: float = 6.0, worker_group: str = "",
                 max_workers: int | None = None, keys: RedisKeys = DEFAULT_KEYS,
                 tls: TlsOptions | None = None, model: str | None = None):
        self.scheduler_config = scheduler_config
        self.keys = keys
        self.tls = tls
        self.model = model
        # What every linked worker serves (fixed by the first one linked).
        self.identity: ModelIdentity | None = None
        # address -> why its worker was refused (logged once per reason).
        self.refused: dict[str, str] = {}
        self.worker_addresses = list(worker_addresses)
        self.redis = redis
        self.mirror = mirror
        self._deliver = deliver
        self._on_serving = on_serving
        self.max_steps_in_flight = max_steps_in_flight
        self.max_migrations = max_migrations
        self.lost_after_s = lost_after_s
        self.worker_group = worker_group
        self.max_workers = max_workers
        self.policy = CacheAwarePolicy()
        self.links: dict[str, WorkerLink] = {}
        # req_id -> the link running it.
        self._req_links: dict[str, WorkerLink] = {}
        self._connecting: set[str] = set()
        self._last_info: worker_pb2.WorkerInfo | None = None
        self._stopping = asyncio.Event()
        self._discovery: asyncio.Task | None = None
        # Sees every step after it was applied (the metrics), if set.
        self.step_observer: Callable[[WorkerLink, SchedulerOutput, list[RequestUpdate]],
                                     None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self, discovery_interval: float) -> None:
        """Link the workers known now, then keep looking every ``discovery_interval`` s."""
        try:
            await self.discover_once()
        except Exception as exc:  # noqa: BLE001 - Redis may be down: the loop keeps looking
            logger.warning("worker discovery failed: %s", exc)
        self._discovery = asyncio.create_task(self._discovery_loop(discovery_interval),
                                              name="worker-discovery")

    async def close(self) -> None:
        """Stop discovery and every link (their requests end with ABORT)."""
        self._stopping.set()
        if self._discovery is not None:
            await stop_tasks([self._discovery], self._stopping)
        for link in list(self.links.values()):
            await link.close()

    async def _discovery_loop(self, interval: float) -> None:
        while not await wait_or_stop(self._stopping, interval):
            try:
                await self.discover_once()
            except Exception as exc:  # noqa: BLE001 - keep looking
                logger.warning("worker discovery failed: %s", exc)

    async def discover_once(self) -> None:
        """Connect to every known worker not linked yet; unlist those whose entry expired."""
        addresses: dict[str, str | None] = {addr: None for addr in self.worker_addresses}
        registered: set[str] | None = None
        if self.redis is not None:
            registered = set()
            keys = [k async for k in self.redis.scan_iter(match=self.keys.worker_pattern)]
            values = await self.redis.mget(keys) if keys else []
            for value in values:
                if value is None:
                    continue
                entry = json.loads(value)
                if entry.get("worker_group", "") != self.worker_group:
                    continue  # another scheduler's worker
                registered.add(entry["worker_id"])
                addresses.setdefault(entry["address"], entry["worker_id"])
        if registered is not None:
            # A worker whose heartbeat expired gets no new requests; its stream lives on
            # (a draining worker finishes its requests), or breaks if it is really gone.
            for worker_id, link in self.links.items():
                is_listed = (worker_id in registered
                             or link.info.address in self.worker_addresses)
                if link.is_listed and not is_listed:
                    logger.warning("worker %s left the registry", worker_id)
                link.is_listed = is_listed
        linked = {link.info.address for link in self.links.values()}
        pending = [addr for addr in addresses
                   if addr not in linked and addr not in self._connecting]
        if self.max_workers is not None:
            # Several schedulers share the registry: each takes a random few of the workers
            # not driven yet (a worker refuses a second scheduler), until it holds its share.
            room = self.max_workers - len(self.links) - len(self._connecting)
            pending = random.sample(pending, min(max(room, 0), len(pending)))
        await asyncio.gather(*(self._connect(addr) for addr in pending))

    async def _connect(self, address: str) -> None:
        self._connecting.add(address)
        channel = internal_channel(address, self.tls, WORKER_SERVER_NAME, channel_options())
        try:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = await stub.GetInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5.0)
            if info.worker_id in self.links or not self._admits(address, info):
                await channel.close()
                return
            link = WorkerLink(info, channel, None, self._on_step, self._on_dead,
                              self.max_steps_in_flight, self.lost_after_s)
            await link.open()
            link.scheduler = await self._build_core(info, link.block_versions)
        except (grpc.aio.AioRpcError, WorkerLinkError) as exc:
            if (isinstance(exc, grpc.aio.AioRpcError) and self.tls is not None
                    and self.tls.is_enabled and exc.code() == grpc.StatusCode.UNAVAILABLE):
                # Also what a worker without a certificate of this deployment's CA looks like.
                self._refuse(address, f"unreachable over mutual TLS ({exc.details()})")
            else:
                logger.debug("cannot link worker at %s: %s", address, exc)
            await channel.close()
            return
        except Exception:
            logger.exception("cannot link worker at %s", address)
            await channel.close()
            return
        finally:
            self._connecting.discard(address)
        self.links[info.worker_id] = link
        self._last_info = info
        self.refused.pop(address, None)
        self.mirror.track(info.worker_id, link.scheduler.block_manager, link.block_versions,
                          lambda: {"num_running": link.scheduler.num_running,
                                   "num_waiting": link.scheduler.num_waiting})
        link.start()
        self.mirror.beat_soon()
        logger.info("linked worker %s at %s (%d KV blocks)", info.worker_id, address,
                    info.num_kv_blocks)
        await self._on_serving(True)

    def _admits(self, address: str, info: worker_pb2.WorkerInfo) -> bool:
        """Whether the worker serves this scheduler's model (name, config, dtype, block
        size); a refusal is logged once per reason."""
        theirs = ModelIdentity.of(info)
        ours = self.identity or (dataclasses.replace(theirs, model=self.model)
                                 if self.model else theirs)
        differences = ours.differences(theirs)
        if differences:
            self._refuse(address, f"worker {info.worker_id} serves another model: "
                                  + "; ".join(differences))
            return False
        # Fixed at admission, not once linked: workers found together link concurrently.
        self.identity = ours
        return True

    def _refuse(self, address: str, reason: str) -> None:
        if self.refused.get(address) != reason:
            logger.warning("refused worker at %s: %s", address, reason)
        self.refused[address] = reason

    async def _build_core(self, info: worker_pb2.WorkerInfo, versions: list[int]) -> Scheduler:
        """A scheduler core for the worker, its prefix cache restored from Redis."""
        own = self.scheduler_config
        # Budgets beyond what the worker was sized for would overrun its CUDA graphs.
        config = dataclasses.replace(
            own, max_num_seqs=min(own.max_num_seqs, info.max_num_seqs or own.max_num_seqs),
            max_num_batched_tokens=min(own.max_num_batched_tokens,
                                       info.max_num_batched_tokens or own.max_num_batched_tokens))
        core = Scheduler(config, model_limits_from_pb(info), info.num_kv_blocks)
        if config.enable_prefix_caching:
            await self.mirror.restore(info.worker_id, info.instance_id, core.block_manager,
                                      versions)
        return core

    # ----------------------------------------------------------------- link callbacks
    def _on_step(self, link: WorkerLink, output: SchedulerOutput,
                 updates: list[RequestUpdate]) -> None:
        for update in updates:
            if update.finished:
                self._req_links.pop(update.req_id, None)
        self._deliver(updates, link.worker_id)
        self.mirror.note_step(link.worker_id, output, updates)
        if self.step_observer is not None:
            self.step_observer(link, output, updates)

    def _on_dead(self, link: WorkerLink, orphans: list[Request]) -> None:
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        self.mirror.untrack(link.worker_id)
        self.mirror.beat_soon()
        if orphans:
            logger.warning("worker %s lost with %d requests; resuming them elsewhere",
                           link.worker_id, len(orphans))
        for request in orphans:
            self._migrate(request)
        if not self.links and not self._stopping.is_set():
            asyncio.ensure_future(self._refresh_health())

    def _migrate(self, request: Request) -> None:
        """Resume a request of a lost worker on another one, from prompt + tokens so far;
        its stream goes on without a gap or a repeated token. Fails it (UNAVAILABLE) when no
        worker is left, the scheduler stops, or it moved ``max_migrations`` times already."""
        links = self.alive_links()
        error = None
        if self._stopping.is_set():
            error = "the scheduler is shutting down"
        elif not links:
            error = "its worker was lost and no other worker is available"
        elif request.num_migrations >= self.max_migrations:
            error = f"its worker was lost {request.num_migrations + 1} times"
        if error is None:
            request.restart()
            link = self.pick(request, links)
            try:
                link.add_request(request)
                self._req_links[request.req_id] = link
                return
            except ValueError as exc:  # e.g. the other worker's pool is smaller
                error = f"it cannot resume on worker {link.worker_id}: {exc}"
        self._req_links.pop(request.req_id, None)
        self._deliver([RequestUpdate(request.req_id, finish_reason=FinishReason.ABORT,
                                     error=f"request {request.req_id} failed: {error}",
                                     error_kind=ErrorKind.UNAVAILABLE)], "")

    async def _refresh_health(self) -> None:
        # Decided when it runs: a worker may have linked since it was scheduled.
        await self._on_serving(bool(self.links))

    # ----------------------------------------------------------------- requests
    def alive_links(self) -> list[WorkerLink]:
        return [link for link in self.links.values()
                if link.is_alive and link.is_listed and not link.is_draining]

    def any_info(self) -> worker_pb2.WorkerInfo:
        """A serving worker's description (NoWorkerError when none)."""
        links = self.alive_links()
        if not links:
            raise NoWorkerError("no worker is connected")
        return links[0].info

    def pick(self, request: Request, links: list[WorkerLink]) -> WorkerLink:
        """The link where the least work stands before the request's first token."""
        return links[pick_worker(request, [link.scheduler for link in links], self.policy)]

    def queued(self) -> tuple[int, int]:
        """Requests waiting over all workers, and their tokens (prompt + output so far)."""
        cores = [link.scheduler for link in self.links.values() if link.is_alive]
        return (sum(core.num_waiting for core in cores),
                sum(core.num_queued_tokens for core in cores))

    def add_request(self, request: Request) -> WorkerLink:
        """Queue a request on the best alive worker (NoWorkerError if there is none)."""
        links = self.alive_links()
        if not links:
            raise NoWorkerError("no worker is connected")
        link = self.pick(request, links)
        link.add_request(request)
        self._req_links[request.req_id] = link
        return link

    def abort(self, req_ids: list[str],
              status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[str]:
        """Finish requests early wherever they run; returns those still unfinished."""
        aborted = []
        for req_id in req_ids:
            link = self._req_links.pop(req_id, None)
            if link is not None and link.is_alive and link.abort([req_id], status):
                aborted.append(req_id)
        return aborted

    # ----------------------------------------------------------------- stats
    def stats(self) -> generate_pb2.GetServerStatsResponse:
        reply = generate_pb2.GetServerStatsResponse(num_schedulers=1)
        for link in self.links.values():
            add_worker_stats(reply, link.worker_id, link.scheduler, link.is_alive,
                             link.info.address)
        return reply

    def model_info(self, scheduler_id: str) -> scheduler_pb2.SchedulerInfo | None:
        """What the workers serve (None before any worker linked)."""
        info = self._last_info
        if info is None:
            return None
        reply = scheduler_pb2.SchedulerInfo(scheduler_id=scheduler_id, model=info.model,
                                            num_workers=len(self.alive_links()))
        return model_limits_to_pb(model_limits_from_pb(info), reply)

    def registry_entry(self, scheduler_id: str, address: str) -> dict:
        stats = self.stats()
        info = self._last_info
        return {"scheduler_id": scheduler_id, "address": address,
                "worker_group": self.worker_group,
                "model": info.model if info else "", "block_size": info.block_size if info else 0,
                "worker_ids": [w.worker_id for w in stats.workers],
                "num_requests_running": stats.num_requests_running,
                "num_requests_waiting": stats.num_requests_waiting,
                "kv_blocks_total": sum(w.kv_blocks_total for w in stats.workers),
                "kv_blocks_free": sum(w.kv_blocks_free for w in stats.workers)}


class NoWorkerError(RuntimeError):
    """No worker can take a request now."""


def pick_worker(request: Request, cores: list[Scheduler], policy: CacheAwarePolicy) -> int:
    """Index of the worker (by its core) the policy picks for ``request``: the cached
    prefix counts only where the prompt also fits in the free KV blocks."""
    block_size = cores[0].block_size
    needed = -(-(request.num_prompt_tokens + 1) // block_size)
    hashes = prompt_block_hashes(request.prompt_token_ids, block_size, request.cache_salt)
    candidates = []
    for i, core in enumerate(cores):
        bm = core.block_manager
        capacity = core.free_capacity()
        hits = bm.num_cached_prefix_blocks(hashes) if capacity >= needed else 0
        candidates.append(Candidate(str(i), hits, core.num_running, core.num_waiting,
                                    core.num_queued_tokens,
                                    min(max(1.0 - capacity / bm.num_blocks, 0.0), 1.0)))
    return policy.choose(candidates, request.num_tokens, block_size)


def add_worker_stats(reply: generate_pb2.GetServerStatsResponse, worker_id: str,
                     core: Scheduler, is_alive: bool, address: str = "") -> None:
    """Add one worker's load and cache counters to a GetStats reply."""
    bm = core.block_manager
    reply.num_requests_running += core.num_running
    reply.num_requests_waiting += core.num_waiting
    reply.prefix_cache_queries += bm.prefix_cache_queries
    reply.prefix_cache_hits += bm.prefix_cache_hits
    reply.num_preemptions += core.num_preemptions
    reply.num_workers_alive += int(is_alive)
    reply.workers.append(generate_pb2.WorkerStats(
        worker_id=worker_id, kv_blocks_total=bm.num_blocks, kv_blocks_free=bm.num_free_blocks,
        address=address, num_requests_running=core.num_running,
        num_requests_waiting=core.num_waiting, is_alive=is_alive,
        prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
        num_queued_tokens=core.num_queued_tokens))
