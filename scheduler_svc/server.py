"""The scheduler service process: the gRPC server, the worker pool and the Redis mirror.

``worker_pool.WorkerPool`` finds and drives the workers; ``servicer.SchedulerServicer``
answers Submit/Abort/GetStats/GetInfo over it; ``redis_mirror.RedisMirror`` mirrors block
state and keeps this scheduler's registry entry alive.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from gridllm.common.config import SchedulerConfig
from gridllm.common.grpc_utils import ServiceServer
from gridllm.v1 import scheduler_pb2_grpc
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.servicer import SchedulerServicer, UpdateStreams
from scheduler_svc.worker_pool import WorkerPool

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
    # Admission: a Submit past these many waiting requests, or waiting tokens (prompt +
    # output so far), over all workers, gets RESOURCE_EXHAUSTED instead of an unbounded queue.
    max_num_queued_reqs: int = 1024
    max_num_queued_tokens: int = 1 << 20
    # Times a request may resume on another worker after losing its own.
    max_migrations: int = 3

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
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}.")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be non-negative, got {self.max_migrations!r}.")


class SchedulerServer:
    """Owns the gRPC server, the worker pool and the Redis mirror.

    Args:
        config: service settings.
    """

    def __init__(self, config: SchedulerServiceConfig | None = None):
        self.config = config or SchedulerServiceConfig()
        self.scheduler_id = self.config.scheduler_id or uuid.uuid4().hex[:12]
        self.redis = None
        if self.config.redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(self.config.redis_url)
        self.address = ""
        self.mirror = RedisMirror(self.redis, self.scheduler_id,
                                  lambda: self.pool.registry_entry(self.scheduler_id,
                                                                   self.address),
                                  self.config.heartbeat_ttl)
        self.service = ServiceServer([SERVICE_NAME])
        streams = UpdateStreams()
        self.pool = WorkerPool(self.config.scheduler_config, self.config.worker_addresses,
                               self.redis, self.mirror, streams.deliver,
                               self.service.set_serving, self.config.enable_prefix_caching,
                               self.config.max_steps_in_flight,
                               max_migrations=self.config.max_migrations,
                               lost_after_s=self.config.heartbeat_ttl)
        self.servicer = SchedulerServicer(self.pool, streams, self.scheduler_id,
                                          self.config.max_num_queued_reqs,
                                          self.config.max_num_queued_tokens)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.service.server)

    async def start(self) -> str:
        """Bind, connect to the workers found so far and start discovery.

        Returns:
            The advertised address (host:port). Health turns SERVING with the first worker.
        """
        cfg = self.config
        port = await self.service.start(f"{cfg.bind_host}:{cfg.port}")
        self.address = f"{cfg.advertise_host or cfg.bind_host}:{port}"
        self.mirror.start()
        await self.pool.start(cfg.discovery_interval)
        logger.info("scheduler %s at %s with %d workers", self.scheduler_id, self.address,
                    len(self.pool.links))
        return self.address

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, drain Submit streams within ``grace``, close links and mirror."""
        await self.service.stop(grace)
        await self._shutdown()

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        await self.service.serve_until_signal(grace, on_stop=self._shutdown)

    async def _shutdown(self) -> None:
        await self.pool.close()
        await self.mirror.close()
        if self.redis is not None:
            await self.redis.aclose()
