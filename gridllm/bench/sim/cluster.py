"""A discrete-event simulation of a gridllm fleet: routers -> schedulers -> workers.

What is real: every worker's scheduler core (scheduler_svc.scheduler.Scheduler, with its
block manager and prefix cache), the scheduler's worker pick (scheduler_svc.worker_pool),
the KV events a step produces (scheduler_svc.kv_events), the routers' prefix index fed by
them (router.kv_index), their load view (router.routing.note_load, from the same GetStats
reply a scheduler builds) and their routing decision (router.routing.choose_link with a
gridllm.common.routing_policy). What is simulated: a worker's step takes the time of a
cost model (gridllm.bench.sim.cost) and samples deterministic token ids; gRPC and Redis
take no time except the lag of the KV events and the routers' stats poll interval.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from gridllm.bench.sim.cost import CostModel
from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ModelLimits, ModelRunnerOutput, SchedulerOutput
from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.routing_policy import CacheAwarePolicy, make_policy
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2
from router.kv_index import KvIndex, RecentRoutes
from router.routing import SchedulerLink, choose_link, note_load
from scheduler_svc.kv_events import KvEventPublisher
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.worker_pool import add_worker_stats, pick_worker

VOCAB_SIZE = 32_000
# Blocks of a prompt the routers look up (as router.routing does).
_MAX_LOOKUP_BLOCKS = 64


@dataclass
class FleetConfig:
    num_workers: int = 8
    workers_per_scheduler: int = 4
    num_routers: int = 2
    routing_policy: str = "cache_aware"
    block_size: int = 16
    num_kv_blocks: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32_768
    # Seconds between a router's GetStats polls of each scheduler.
    poll_interval_s: float = 0.5
    # Seconds from a step's end until its KV events reach the routers' index.
    event_lag_s: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_workers", "workers_per_scheduler", "num_routers", "num_kv_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class SimRequest:
    """One request as the workload issues it."""

    req_id: str
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int
    # Called when it finishes, with its output token ids and the time (chat sessions
    # issue their next turn from it).
    on_finish: Callable[[list[int], float], None] | None = None
    # Filled by the simulation.
    first_token_s: float | None = None
    finish_s: float | None = None
    num_cached_tokens: int = 0


class SimWorker:
    """A scheduler core whose steps take the cost model's time."""

    def __init__(self, worker_id: str, config: FleetConfig, cost: CostModel):
        self.worker_id = worker_id
        self.cost = cost
        limits = ModelLimits(max_model_len=config.max_model_len, vocab_size=VOCAB_SIZE,
                             block_size=config.block_size)
        self.core = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                              max_num_batched_tokens=config.max_num_batched_tokens),
                              limits, config.num_kv_blocks)
        self.is_stepping = False
        self.busy_s = 0.0
        self.num_steps = 0
        self._output: SchedulerOutput | None = None

    def start_step(self) -> float | None:
        """Schedule a step; its duration, or None if there is nothing to run."""
        output = self.core.schedule()
        if output.is_empty:
            return None
        num_prefill = num_decode = num_context = 0
        requests = self.core.requests
        for req_id, num in output.num_scheduled_tokens.items():
            request = requests[req_id]
            start = request.num_computed_tokens - num
            num_context += request.num_computed_tokens
            if num == 1 and start >= request.num_prompt_tokens:
                num_decode += 1
            else:
                num_prefill += num
        self._output = output
        self.is_stepping = True
        self.num_steps += 1
        duration = self.cost.step_s(num_prefill, num_decode, num_context)
        self.busy_s += duration
        return duration

    def finish_step(self):
        """Apply the step's samples; the request updates."""
        output, self._output = self._output, None
        assert output is not None, "finish_step without a step"
        self.is_stepping = False
        runner = ModelRunnerOutput()
        for req_id in output.num_scheduled_tokens:
            request = self.core.requests.get(req_id)
            if request is not None and request.num_output_placeholders:
                runner.req_ids.append(req_id)
                runner.sampled_token_ids[req_id] = [_token(req_id, request.num_tokens)]
        return self.core.update_from_output(output, runner)


def _token(req_id: str, position: int) -> int:
    """A deterministic 'sampled' token id (never a special id)."""
    return (zlib.crc32(req_id.encode()) * 2654435761 + position * 40503) % (VOCAB_SIZE - 3) + 3


class Simulation:
    """The fleet and its event loop.

    Args:
        config: the fleet's shape and settings.
        cost: the workers' step time.
    """

    def __init__(self, config: FleetConfig, cost: CostModel):
        self.config = config
        self.now = 0.0
        self.workers = [SimWorker(f"w{i}", config, cost) for i in range(config.num_workers)]
        size = config.workers_per_scheduler
        self.groups = [self.workers[i:i + size] for i in range(0, len(self.workers), size)]
        # One worker pick policy per scheduler, as each scheduler process has its own.
        self.pick_policies = [CacheAwarePolicy(seed=config.seed + i)
                              for i in range(len(self.groups))]
        self.index = KvIndex()
        self.routers = [_Router(self, r) for r in range(config.num_routers)]
        self.publisher = KvEventPublisher(None, "sim")
        self._heap: list = []
        self._seq = itertools.count()
        self._events: collections.deque = collections.deque()
        # req_id -> (the router's link it went through, the request, the core's request).
        self._req_route: dict[str, tuple[SchedulerLink, SimRequest, Request, int]] = {}
        self.requests: list[SimRequest] = []
        self._next_router = 0
        self._num_arrivals_pending = 0

    # ----------------------------------------------------------------- events
    def _push(self, time_s: float, kind: str, payload) -> None:
        heapq.heappush(self._heap, (time_s, next(self._seq), kind, payload))

    def submit(self, request: SimRequest) -> None:
        """Queue a request's arrival (at ``request.arrival_s``)."""
        self.requests.append(request)
        self._num_arrivals_pending += 1
        self._push(request.arrival_s, "arrival", request)

    def run(self, max_sim_s: float = 3600.0) -> None:
        """Run until every request finished (or ``max_sim_s`` of simulated time)."""
        self._push(0.0, "poll", None)
        num_open = 0
        while self._heap:
            time_s, _, kind, payload = heapq.heappop(self._heap)
            if time_s > max_sim_s:
                break
            self.now = time_s
            if kind == "arrival":
                num_open += 1
                self._num_arrivals_pending -= 1
                self._arrive(payload)
            elif kind == "step":
                num_open -= self._step_done(payload)
            elif kind == "poll":
                self._poll()
                if num_open or self._num_arrivals_pending:
                    self._push(self.now + self.config.poll_interval_s, "poll", None)

    def _arrive(self, request: SimRequest) -> None:
        self._apply_events()
        router = self.routers[self._next_router % len(self.routers)]
        self._next_router += 1
        link = router.route(request)
        group = int(link.address)
        workers = self.groups[group]
        core_request = Request(request.req_id, request.prompt_token_ids,
                               SamplingParams(temperature=0.0, max_tokens=request.output_len,
                                              ignore_eos=True), arrival_time=self.now)
        index = pick_worker(core_request, [w.core for w in workers], self.pick_policies[group])
        worker = workers[index]
        worker.core.add_request(core_request)
        self._req_route[request.req_id] = (link, request, core_request, link.admit())
        if not worker.is_stepping:
            self._start(worker)

    def _start(self, worker: SimWorker) -> None:
        duration = worker.start_step()
        if duration is not None:
            self._push(self.now + duration, "step", worker)

    def _step_done(self, worker: SimWorker) -> int:
        updates = worker.finish_step()
        num_finished = 0
        for update in updates:
            link, request, core_request, polls_before = self._req_route[update.req_id]
            if request.first_token_s is None and update.new_token_ids:
                request.first_token_s = self.now
                request.num_cached_tokens = max(update.num_cached_tokens, 0)
                link.prefilled()
            if update.finished:
                num_finished += 1
                del self._req_route[update.req_id]
                link.release(polls_before)
                request.finish_s = self.now
                if request.on_finish is not None:
                    request.on_finish(list(core_request.output_token_ids), self.now)
        self._publish(worker)
        self._start(worker)
        return num_finished

    def _publish(self, worker: SimWorker) -> None:
        # As the Redis mirror records a step: removals first, then what is cached now.
        bm = worker.core.block_manager
        stored, removed = bm.drain_events()
        if not stored and not removed:
            return
        cached = {}
        for block_hash in (*removed, *stored):
            entry = bm.cached_entry(block_hash)
            cached[block_hash] = None if entry is None else (
                entry[0], 0, entry[1], bm.cached_parent(block_hash))
        events = self.publisher.changes(worker.worker_id, bm.block_size, cached)
        self._events.append((self.now + self.config.event_lag_s, events))

    def _apply_events(self) -> None:
        while self._events and self._events[0][0] <= self.now:
            for event in self._events.popleft()[1]:
                self.index.apply(event)

    def _poll(self) -> None:
        for group, workers in enumerate(self.groups):
            stats = generate_pb2.GetServerStatsResponse()
            for worker in workers:
                add_worker_stats(stats, worker.worker_id, worker.core, True)
            for router in self.routers:
                link = router.links[group]
                note_load(link, stats, link.begin_poll())


class _Router:
    """One router's state: its links (load view, in-flight counts), policy and recent
    routes; the prefix index is the fleet's (every router reads the same log)."""

    def __init__(self, sim: Simulation, number: int):
        self.sim = sim
        self.policy = make_policy(sim.config.routing_policy, seed=sim.config.seed * 7919 + number)
        self.recent = RecentRoutes(clock=lambda: sim.now)
        self.links = []
        for group, workers in enumerate(sim.groups):
            link = SchedulerLink(str(group), None, None, is_alive=True)  # type: ignore[arg-type]
            link.worker_ids = [w.worker_id for w in workers]
            self.links.append(link)

    def route(self, request: SimRequest) -> SchedulerLink:
        if len(self.links) == 1:
            self.links[0].routed(len(request.prompt_token_ids), len(request.prompt_token_ids))
            return self.links[0]
        block_size = self.sim.config.block_size
        hashes = prompt_block_hashes(request.prompt_token_ids, block_size, None,
                                     _MAX_LOOKUP_BLOCKS)
        overlaps: dict[str, int] = {}
        if self.policy.name == "cache_aware":
            per_worker = self.sim.index.overlap([w.worker_id for w in self.sim.workers], hashes)
            overlaps = {link.address: max(per_worker[w] for w in link.worker_ids)
                        for link in self.links}
        return choose_link(self.links, overlaps, self.policy, request.prompt_token_ids,
                           block_size, hashes, self.recent)


@dataclass
class SimResult:
    num_requests: int
    num_finished: int
    hit_rate: float
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    sim_duration_s: float = 0.0
    num_output_tokens: int = 0
    # Busiest worker's busy time over the mean's.
    imbalance: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0


def summarize(sim: Simulation) -> SimResult:
    done = [r for r in sim.requests if r.finish_s is not None]
    finishes = [(r.finish_s, r) for r in done if r.finish_s is not None]
    queries = sum(w.core.block_manager.prefix_cache_queries for w in sim.workers)
    hits = sum(w.core.block_manager.prefix_cache_hits for w in sim.workers)
    busy = [w.busy_s for w in sim.workers]
    mean_busy = sum(busy) / len(busy)
    return SimResult(
        num_requests=len(sim.requests), num_finished=len(done),
        hit_rate=hits / queries if queries else 0.0,
        ttft_s=[r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None],
        e2e_s=[finish - r.arrival_s for finish, r in finishes],
        sim_duration_s=max((finish for finish, _ in finishes), default=0.0),
        num_output_tokens=sum(r.output_len for r in done),
        imbalance=max(busy) / mean_busy if mean_busy else 0.0,
        num_steps=sum(w.num_steps for w in sim.workers),
        num_preemptions=sum(w.core.num_preemptions for w in sim.workers))
