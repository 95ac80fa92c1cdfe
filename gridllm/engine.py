"""The in-process engine core: scheduler + model runner, one step at a time."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.contract import RequestUpdate
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.request import Request, RequestStatus, build_request
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.step_pipeline import StepPipeline
from worker_svc.logits_processors import verify_logits_processors

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_requests_running: int
    num_requests_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class EngineCore:
    """Builds the model runner, then the scheduler over the limits and KV pool it resolved.

    Args:
        model_config, cache_config, scheduler_config: as given by the user.
        eos_token_id: the tokenizer's EOS id (None without a tokenizer).
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, eos_token_id: int | None = None):
        from worker_svc.ranks.launch import build_runner

        # With tensor_parallel_size > 1: rank 0 of a group of processes (worker_svc/parallel).
        self.runner = build_runner(model_config, cache_config, scheduler_config,
                                   eos_token_id=eos_token_id)
        limits = self.runner.limits
        self.scheduler = Scheduler(scheduler_config, limits, self.runner.num_kv_blocks)
        self.eos_token_id = eos_token_id
        self.vocab_size = limits.vocab_size
        self.max_model_len = limits.max_model_len
        logger.info("KV cache: %d blocks of %d tokens", self.runner.num_kv_blocks,
                    limits.block_size)

    def set_eos_token_id(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id
        self.runner.eos_token_id = eos_token_id

    def make_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     priority: int = 0, extra_stop_token_ids: Iterable[int] = ()) -> Request:
        """Validate a prompt against this model and build its Request (ValueError if bad)."""
        request = build_request(req_id, prompt_token_ids, params, self.vocab_size,
                                eos_token_id=self.eos_token_id, priority=priority,
                                extra_stop_token_ids=tuple(extra_stop_token_ids))
        verify_logits_processors(params)
        self.scheduler.check_prompt(prompt_token_ids)
        return request

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[str]:
        return self.scheduler.abort_requests(req_ids, status)

    def has_unfinished_requests(self) -> bool:
        """True while requests run or steps are in flight (``step`` until False drains)."""
        return self.scheduler.has_unfinished_requests() or self.pipeline.num_in_flight > 0

    @property
    def max_steps_in_flight(self) -> int:
        """2 on CUDA: step N+1 runs on the GPU while the host applies step N (a request
        that finishes at N costs one wasted slot at N+1); 1 elsewhere, where a step runs
        inside the call that queues it and there is nothing to overlap."""
        return self.pipeline.max_steps_in_flight

    @max_steps_in_flight.setter
    def max_steps_in_flight(self, value: int) -> None:
        if self.pipeline.num_in_flight:
            raise RuntimeError("max_steps_in_flight can change only between steps in flight.")
        self._pipeline = StepPipeline(self.scheduler, value)

    @property
    def pipeline(self) -> StepPipeline:
        """The step loop shared with the scheduler service (built on first use)."""
        pipeline = getattr(self, "_pipeline", None)
        if pipeline is None:
            steps = 2 if self.runner.device.type == "cuda" else 1
            pipeline = self._pipeline = StepPipeline(self.scheduler, steps)
        return pipeline

    def step(self) -> list[RequestUpdate]:
        """Queue steps on the runner until ``max_steps_in_flight`` are in flight, then
        apply the oldest one's output (its sampled ids are the only thing waited for)."""
        pipeline = self.pipeline
        while (step := pipeline.schedule_next()) is not None:
            try:
                step.handle = self.runner.execute_model_async(step.output)
            except BaseException:
                pipeline.discard(step)
                raise
        if not pipeline.num_in_flight:
            return []
        _, updates = pipeline.complete(pipeline.oldest().handle.get_output())
        return updates

    def shutdown(self) -> None:
        """Stop the runner's other tensor-parallel ranks, if any (idempotent)."""
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting,
                           bm.num_blocks, bm.num_free_blocks, bm.prefix_cache_queries,
                           bm.prefix_cache_hits, self.scheduler.num_preemptions)
