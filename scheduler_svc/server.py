"""The scheduler service process: the gRPC server, the worker pool and the Redis mirror.

``worker_pool.WorkerPool`` finds and drives the workers; ``servicer.SchedulerServicer``
answers Submit/Session/Abort/GetStats/GetInfo over it; ``redis_mirror.RedisMirror`` mirrors block
state and keeps this scheduler's registry entry alive.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from gridllm.common.cli_args import option
from gridllm.common.config import HEARTBEAT_TTL_S, SchedulerConfig, check_port, require
from gridllm.common.grpc_utils import ServiceServer, advertised_address
from gridllm.common.http_server import HttpServer
from gridllm.common.metrics import serve_metrics
from gridllm.common.redis_client import async_redis, check_redis
from gridllm.common.redis_keys import DEFAULT_DEPLOYMENT, RedisKeys, check_deployment
from gridllm.common.tls import TlsOptions, server_credentials
from gridllm.v1 import scheduler_pb2_grpc
from scheduler_svc.metrics import SchedulerMetrics
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.servicer import SchedulerServicer, UpdateStreams
from scheduler_svc.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

SERVICE_NAME = "gridllm.v1.Scheduler"


@dataclass
class SchedulerServiceConfig:
    # Budgets, policy and prefix caching; max_model_len comes from each worker.
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker_addresses: list[str] = option(
        default_factory=list, flag="--worker", metavar="HOST:PORT",
        help="a worker to drive (repeatable), besides those registered in Redis")
    redis_url: str | None = option(
        None, help="Redis to discover workers in, mirror block state to and register in")
    worker_group: str = option(
        "", metavar="NAME", help="link only the registered workers of this group (their "
        "--worker-group); one scheduler per group. Empty: the default group")
    max_workers: int | None = option(
        None, default_help="no limit", help="link at most this many workers: schedulers "
        "sharing one registry (and group) then split its workers between them, as each "
        "worker takes one scheduler")
    scheduler_id: str | None = option(None, default_help="a fresh uuid", help="registry id")
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(0, help="port to bind; 0 picks a free one")
    advertise_host: str | None = option(
        None, default_help="--host; the hostname if --host is 0.0.0.0",
        help="host routers dial")
    discovery_interval: float = option(
        1.0, metavar="S",
        help="seconds between looks for new workers in Redis and retries of lost ones")
    heartbeat_ttl: float = option(
        HEARTBEAT_TTL_S, metavar="S", help="seconds the registry entry outlives the last heartbeat")
    max_steps_in_flight: int = option(
        2, choices=(1, 2),
        help="2: step N+1 is sent while the worker runs step N (pipelined); 1: one at a time")
    max_num_queued_reqs: int = option(
        1024, help="admission: past this many waiting requests (all workers), Submit gets "
        "RESOURCE_EXHAUSTED with a retry hint instead of an unbounded queue")
    max_num_queued_tokens: int = option(
        1 << 20, help="admission: past this many waiting tokens (prompt + output so far, all "
        "workers) a new request gets RESOURCE_EXHAUSTED; an empty queue takes any request")
    max_migrations: int = option(
        3, help="times a request may resume on another worker after losing its own")
    metrics_port: int | None = option(
        None, default_help="off",
        help="port of the Prometheus /metrics endpoint (on --host); 0 picks a free one")
    kv_events_max_len: int = option(
        100_000, metavar="N", help="KV events (blocks stored/removed) are published to the "
        "stack-wide log in Redis, which keeps about this many newest events; 0: publish none")
    deployment: str = option(
        DEFAULT_DEPLOYMENT, metavar="NAME",
        help="the deployment's namespace in Redis (keys gridllm:NAME:*): only its workers "
             "are linked")
    model: str | None = option(
        None, default_help="the first linked worker's",
        help="the model (name or path, as the workers' --model) every worker must serve; "
             "a worker serving another model, dtype or block size is refused")
    # Mutual TLS: the server takes only clients with the CA's certificates, the links to
    # the workers present this one.
    tls: TlsOptions = field(default_factory=TlsOptions)

    def __post_init__(self) -> None:
        check_deployment(self.deployment)
        check_port(self.port)
        require(self.discovery_interval > 0, "discovery_interval", "must be positive",
                self.discovery_interval)
        require(self.max_steps_in_flight in (1, 2), "max_steps_in_flight", "must be 1 or 2",
                self.max_steps_in_flight)
        require(self.heartbeat_ttl >= 1.0, "heartbeat_ttl", "must be at least 1 second",
                self.heartbeat_ttl)
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        require(self.max_migrations >= 0, "max_migrations", "must be non-negative",
                self.max_migrations)
        if self.metrics_port is not None:
            check_port(self.metrics_port, "metrics_port")
        require(self.max_workers is None or (isinstance(self.max_workers, int)
                                             and self.max_workers >= 1),
                "max_workers", "must be at least 1", self.max_workers)
        require(self.kv_events_max_len >= 0, "kv_events_max_len", "must be non-negative",
                self.kv_events_max_len)


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
            self.redis = async_redis(self.config.redis_url)
        self.address = ""
        keys = RedisKeys(self.config.deployment)
        self.mirror = RedisMirror(self.redis, self.scheduler_id,
                                  lambda: self.pool.registry_entry(self.scheduler_id,
                                                                   self.address),
                                  self.config.heartbeat_ttl, self.config.kv_events_max_len,
                                  keys)
        self.service = ServiceServer([SERVICE_NAME],
                                     credentials=server_credentials(self.config.tls))
        streams = UpdateStreams()
        self.pool = WorkerPool(self.config.scheduler_config, self.config.worker_addresses,
                               self.redis, self.mirror, streams.deliver,
                               self.service.set_serving, self.config.max_steps_in_flight,
                               max_migrations=self.config.max_migrations,
                               lost_after_s=self.config.heartbeat_ttl,
                               worker_group=self.config.worker_group,
                               max_workers=self.config.max_workers, keys=keys,
                               tls=self.config.tls, model=self.config.model)
        self.servicer = SchedulerServicer(self.pool, streams, self.scheduler_id,
                                          self.config.max_num_queued_reqs,
                                          self.config.max_num_queued_tokens,
                                          self.service.draining.is_set)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.service.server)
        self.metrics = SchedulerMetrics(self.pool, streams=self.servicer)
        self.pool.step_observer = self.metrics.on_step
        self.mirror.on_flush = self.metrics.mirror_lag.observe
        # Serving /metrics (None without --metrics-port); metrics_port is its bound port.
        self.metrics_server: HttpServer | None = None
        self.metrics_port = 0

    async def start(self) -> str:
        """Bind, connect to the workers found so far and start discovery.

        Returns:
            The advertised address (host:port). Health turns SERVING with the first worker.
        """
        cfg = self.config
        if self.redis is not None:
            await check_redis(self.redis, str(cfg.redis_url))
        port = await self.service.start(f"{cfg.host}:{cfg.port}")
        self.address = advertised_address(cfg.host, cfg.advertise_host, port)
        self.mirror.start()
        if cfg.metrics_port is not None:
            self.metrics_server = await serve_metrics(self.metrics.registry, cfg.host,
                                                      cfg.metrics_port)
            self.metrics_port = self.metrics_server.port
        await self.pool.start(cfg.discovery_interval)
        logger.info("scheduler %s at %s with %d workers", self.scheduler_id, self.address,
                    len(self.pool.links))
        return self.address

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, drain Submit and Session streams within ``grace``, close links
        and mirror."""
        await self._begin_drain()
        await self.service.stop(grace)
        await self._shutdown()

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        await self.service.serve_until_signal(grace, on_stop=self._shutdown,
                                              before_stop=self._begin_drain)

    async def _begin_drain(self) -> None:
        # Sessions refuse new submits from now on and end once their requests are done
        # (an idle one at once), so the drain does not wait out the grace period.
        await self.service.begin_drain()
        self.servicer.wake_sessions()

    async def _shutdown(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop(1.0)
        await self.pool.close()
        await self.mirror.close()
        if self.redis is not None:
            await self.redis.aclose()
