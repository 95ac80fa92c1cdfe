"""The scheduler service: Submit/Abort over a pool of workers, one step loop each.

Workers are found in Redis (``gridllm:worker:*``) or given as addresses. Each connected
worker gets a scheduler core (its own KV pool) and a WorkerLink; a new request goes to
the worker holding most of its prefix, else to the one with most free KV capacity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from gridllm import redis_keys
from gridllm.config import CacheConfig, SchedulerConfig
from gridllm.grpc_utils import ServiceServer, channel_options, stop_tasks, wait_or_stop
from gridllm.v1 import generate_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler_svc.block_manager import hash_block
from scheduler_svc.output import RequestUpdate, SchedulerOutput
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.servicer import SchedulerServicer
from scheduler_svc.worker_link import WorkerLink, WorkerLinkError

logger = logging.getLogger(__name__)

SERVICE_NAME = "gridllm.v1.Scheduler"


@dataclass
class SchedulerServiceConfig:
    # Budgets and policy; max_model_len comes from the workers.
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_prefix_caching: bool = True
    # Worker addresses to dial (besides those found in Redis).
    worker_addresses: list[str] = field(default_factory=list)
    redis_url: str | None = None
    # Registry id; None: a fresh uuid.
    scheduler_id: str | None = None
    bind_host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    # Seconds between looks for new workers in Redis / retries of lost ones.
    discovery_interval: float = 1.0
    # Registry entries expire this many seconds after the last heartbeat.
    heartbeat_ttl: float = 6.0
    # 2: step N+1 is sent while the worker runs step N (pipelined); 1: one step at a time.
    max_steps_in_flight: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}.")
        if self.discovery_interval <= 0:
            raise ValueError("discovery_interval must be positive, "
                             f"got {self.discovery_interval!r}.")
        if self.max_steps_in_flight not in (1, 2):
            raise ValueError("max_steps_in_flight must be 1 or 2, "
                             f"got {self.max_steps_in_flight!r}.")
        if self.heartbeat_ttl < 1.0:
            raise ValueError("heartbeat_ttl must be at least 1 second, "
                             f"got {self.heartbeat_ttl!r}.")


class SchedulerServer:
    """Owns the gRPC server, the worker links, discovery and the Redis mirror.

    Args:
        config: service settings.
    """

    def __init__(self, config: SchedulerServiceConfig | None = None):
        self.config = config or SchedulerServiceConfig()
        self.scheduler_id = self.config.scheduler_id or uuid.uuid4().hex[:12]
        self.links: dict[str, WorkerLink] = {}
        self._connecting: set[str] = set()
        self.redis = None
        if self.config.redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(self.config.redis_url)
        self.mirror = RedisMirror(self.redis, self.scheduler_id, self._registry_entry,
                                  self.config.heartbeat_ttl)
        self.servicer = SchedulerServicer(self)
        self.service = ServiceServer([SERVICE_NAME])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.service.server)
        self.address = ""
        self._discovery: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._last_info: worker_pb2.WorkerInfo | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        """Bind, connect to the workers found so far and start discovery.

        Returns:
            The advertised address (host:port). Health turns SERVING with the first worker.
        """
        cfg = self.config
        port = await self.service.start(f"{cfg.bind_host}:{cfg.port}")
        self.address = f"{cfg.advertise_host or cfg.bind_host}:{port}"
        self.mirror.start()
        await self.discover_once()
        self._discovery = asyncio.create_task(self._discovery_loop(), name="worker-discovery")
        logger.info("scheduler %s at %s with %d workers", self.scheduler_id, self.address,
                    len(self.links))
        return self.address

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, drain Submit streams within ``grace``, close links and mirror."""
        self._stopping.set()
        await self.service.set_serving(False)
        await self.service.server.stop(grace)
        await self._shutdown()

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        await self.service.serve_until_signal(grace, on_stop=self._shutdown)

    async def _shutdown(self) -> None:
        if self._discovery is not None:
            await stop_tasks([self._discovery], self._stopping)
        for link in list(self.links.values()):
            await link.close()
        await self.mirror.close()
        if self.redis is not None:
            await self.redis.aclose()

    # ----------------------------------------------------------------- discovery
    async def _discovery_loop(self) -> None:
        while not await wait_or_stop(self._stopping, self.config.discovery_interval):
            try:
                await self.discover_once()
            except Exception as exc:  # noqa: BLE001 - keep looking
                logger.warning("worker discovery failed: %s", exc)

    async def discover_once(self) -> None:
        """Connect to every known worker not linked yet; drop those whose entry expired."""
        addresses = {addr: None for addr in self.config.worker_addresses}
        registered: set[str] | None = None
        if self.redis is not None:
            registered = set()
            keys = [k async for k in self.redis.scan_iter(match=redis_keys.WORKER_PATTERN)]
            values = await self.redis.mget(keys) if keys else []
            for value in values:
                if value is None:
                    continue
                entry = json.loads(value)
                registered.add(entry["worker_id"])
                addresses.setdefault(entry["address"], entry["worker_id"])
        if registered is not None:
            # A worker whose heartbeat expired gets no new requests; its stream lives on
            # (a draining worker finishes its requests), or breaks if it is really gone.
            for worker_id, link in self.links.items():
                is_listed = (worker_id in registered
                             or link.info.address in self.config.worker_addresses)
                if link.is_listed and not is_listed:
                    logger.warning("worker %s left the registry", worker_id)
                link.is_listed = is_listed
        linked = {link.info.address for link in self.links.values()}
        pending = [addr for addr in addresses
                   if addr not in linked and addr not in self._connecting]
        await asyncio.gather(*(self._connect(addr) for addr in pending))

    async def _connect(self, address: str) -> None:
        self._connecting.add(address)
        channel = grpc.aio.insecure_channel(address, options=channel_options())
        try:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = await stub.GetInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5.0)
            if info.worker_id in self.links:
                await channel.close()
                return
            link = WorkerLink(info, channel, None, self._on_step, self._on_dead,
                              self.config.max_steps_in_flight)
            await link.open()
            link.scheduler = await self._build_core(info, link.block_versions)
        except (grpc.aio.AioRpcError, WorkerLinkError) as exc:
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
        self.mirror.track(info.worker_id, link.scheduler.block_manager, link.block_versions,
                          lambda: self._worker_stats(link))
        link.start()
        self.mirror.beat_soon()
        logger.info("linked worker %s at %s (%d KV blocks)", info.worker_id, address,
                    info.num_kv_blocks)
        await self.service.set_serving(True)

    async def _build_core(self, info: worker_pb2.WorkerInfo, versions: list[int]) -> Scheduler:
        """A scheduler core for the worker, its prefix cache restored from Redis."""
        own = self.config.scheduler_config
        scheduler_config = SchedulerConfig(
            max_num_seqs=min(own.max_num_seqs, info.max_num_seqs or own.max_num_seqs),
            max_num_batched_tokens=min(own.max_num_batched_tokens,
                                       info.max_num_batched_tokens or own.max_num_batched_tokens),
            max_model_len=info.max_model_len, enable_chunked_prefill=own.enable_chunked_prefill,
            policy=own.policy)
        cache_config = CacheConfig(block_size=info.block_size, num_kv_blocks=info.num_kv_blocks,
                                   enable_prefix_caching=self.config.enable_prefix_caching)
        core = Scheduler(scheduler_config, cache_config)
        if self.config.enable_prefix_caching:
            await self.mirror.restore(info.worker_id, info.instance_id, core.block_manager,
                                      versions)
        return core

    # ----------------------------------------------------------------- link callbacks
    def _on_step(self, link: WorkerLink, output: SchedulerOutput,
                 updates: list[RequestUpdate]) -> None:
        self.servicer.deliver(updates)
        self.mirror.note_step(link.worker_id, output, updates)

    def _on_dead(self, link: WorkerLink) -> None:
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        self.mirror.untrack(link.worker_id)
        self.mirror.beat_soon()
        if not self.links and not self._stopping.is_set():
            asyncio.ensure_future(self._refresh_health())

    async def _refresh_health(self) -> None:
        # Decided when it runs: a worker may have linked since it was scheduled.
        await self.service.set_serving(bool(self.links))

    # ----------------------------------------------------------------- routing
    def alive_links(self) -> list[WorkerLink]:
        return [link for link in self.links.values()
                if link.is_alive and link.is_listed and not link.is_draining]

    def pick_link(self, request: Request, links: list[WorkerLink]) -> WorkerLink:
        """The link holding most of the prompt's prefix with room for it, else the freest."""
        block_size = links[0].scheduler.block_size
        needed = -(-(request.num_prompt_tokens + 1) // block_size)
        hashes, parent = [], 0
        tokens = request.prompt_token_ids
        for i in range((len(tokens) - 1) // block_size):
            parent = hash_block(parent, tuple(tokens[i * block_size:(i + 1) * block_size]),
                                request.cache_salt)
            hashes.append(parent)

        def score(link: WorkerLink) -> tuple[int, int]:
            capacity = _capacity(link.scheduler)
            hits = 0
            if capacity >= needed:
                cached = link.scheduler.block_manager.cached_blocks
                for block_hash in hashes:
                    if block_hash not in cached:
                        break
                    hits += 1
            return hits, capacity

        return max(links, key=score)

    # ----------------------------------------------------------------- stats
    def _worker_stats(self, link: WorkerLink) -> dict:
        return {"num_running": link.scheduler.num_running,
                "num_waiting": link.scheduler.num_waiting}

    def stats(self) -> generate_pb2.GetServerStatsResponse:
        reply = generate_pb2.GetServerStatsResponse(num_schedulers=1)
        for link in self.links.values():
            core, bm = link.scheduler, link.scheduler.block_manager
            reply.num_requests_running += core.num_running
            reply.num_requests_waiting += core.num_waiting
            reply.prefix_cache_queries += bm.prefix_cache_queries
            reply.prefix_cache_hits += bm.prefix_cache_hits
            reply.num_preemptions += core.num_preemptions
            reply.num_workers_alive += int(link.is_alive)
            reply.workers.append(generate_pb2.WorkerStats(
                worker_id=link.worker_id, kv_blocks_total=bm.num_blocks,
                kv_blocks_free=bm.num_free_blocks, address=link.info.address,
                num_requests_running=core.num_running, num_requests_waiting=core.num_waiting,
                is_alive=link.is_alive))
        return reply

    def model_info(self) -> scheduler_pb2.SchedulerInfo | None:
        info = self._last_info
        if info is None:
            return None
        reply = scheduler_pb2.SchedulerInfo(
            scheduler_id=self.scheduler_id, model=info.model, max_model_len=info.max_model_len,
            vocab_size=info.vocab_size, block_size=info.block_size,
            num_workers=len(self.alive_links()))
        if info.HasField("eos_token_id"):
            reply.eos_token_id = info.eos_token_id
        return reply

    def _registry_entry(self) -> dict:
        stats = self.stats()
        info = self._last_info
        return {"scheduler_id": self.scheduler_id, "address": self.address,
                "model": info.model if info else "", "block_size": info.block_size if info else 0,
                "worker_ids": [w.worker_id for w in stats.workers],
                "num_requests_running": stats.num_requests_running,
                "num_requests_waiting": stats.num_requests_waiting,
                "kv_blocks_total": sum(w.kv_blocks_total for w in stats.workers),
                "kv_blocks_free": sum(w.kv_blocks_free for w in stats.workers)}


def _capacity(core: Scheduler) -> int:
    # Free blocks minus what the queued prompts will take.
    bm = core.block_manager
    demand = sum(-(-r.num_tokens // bm.block_size) for r in core.waiting)
    return bm.num_free_blocks - demand
