"""``gridllm.LLM``: the vLLM-style offline API over the in-process engine."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

from gridllm.common.config import engine_configs
from gridllm.common.heap import frozen_heap
from gridllm.common.logger import configure_logging
from gridllm.common.output_processor import OutputProcessor
from gridllm.common.outputs import RequestOutput
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer
from gridllm.engine import EngineCore
from scheduler_svc.request import RequestStatus

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


class LLM:
    """Generate completions in-process, as ``vllm.LLM`` does.

    Args:
        model: HF directory, GGUF file or preset name (``"smollm2-135m"``).
        profile_dir: if set, a torch profiler Chrome trace of the steps of each
            ``generate`` call is written there.
        **kwargs: fields of ``ModelConfig``, ``CacheConfig`` and ``SchedulerConfig``
            (``gridllm.common.config``), by name, e.g. ``tokenizer``, ``skip_tokenizer_init``,
            ``dtype`` (``auto``: bf16 on CUDA, fp32 on CPU), ``device``, ``max_model_len``
            (default: the model's), ``attention_backend``, ``enforce_eager``, ``seed``,
            ``block_size``, ``num_kv_blocks``, ``kv_cache_memory`` (bytes, or ``"1GiB"``),
            ``gpu_memory_utilization``, ``max_num_seqs``, ``max_num_batched_tokens``,
            ``enable_chunked_prefill``, ``enable_prefix_caching``, ``scheduling_policy``
            (``fcfs`` or ``priority``), ``block_reservation`` (``none`` or ``predicted``),
            ``prefetch_ratio``, and the request limits ``max_n``, ``max_logprobs``,
            ``max_num_stop_strings``, ``max_stop_string_len``, ``max_num_stop_token_ids``,
            ``max_num_logit_bias``, and ``tensor_parallel_size`` (shard the model over that
            many devices, one process each: this process is rank 0 and starts the others,
            so a script using it must guard its entry point with
            ``if __name__ == "__main__":``). The defaults are those of the dataclasses.
    Raises:
        ValueError: an unknown argument (named), a bad value (its field named), or a model
            that cannot be found or loaded.
    """

    def __init__(self, model: str, *, profile_dir: str | None = None, **kwargs: Any):
        from worker_svc.loader import resolve_model_path

        configure_logging()
        model_config, cache_config, scheduler_config = engine_configs(model, **kwargs)
        model_path = resolve_model_path(model)
        self.model_config = dataclasses.replace(model_config, model=model_path)
        tokenizer_dir = model_config.tokenizer or (model_path if os.path.isdir(model_path)
                                                   else None)
        self.tokenizer = (None if model_config.skip_tokenizer_init
                          else load_tokenizer(tokenizer_dir))
        self.engine = EngineCore(self.model_config, cache_config, scheduler_config)
        eos_ids = eos_token_ids(self.tokenizer, self.engine.runner.hf_config,
                                model_path if os.path.isdir(model_path) else None)
        self.engine.set_eos_token_id(eos_ids[0] if eos_ids else None)
        self._extra_stop_ids = eos_ids[1:]
        self.request_limits = scheduler_config.request_limits()
        self.profile_dir = profile_dir
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel follower processes (``tensor_parallel_size`` >
        1; also done when the LLM is garbage-collected or the interpreter exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any | None:
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: Sequence[int] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in prompt order.

        Args:
            prompts: a ``str`` or ``{"prompt_token_ids": [...]}``, or a list of them.
            sampling_params: one for all prompts, or one per prompt.
            priority: one per prompt (``scheduling_policy="priority"``; lower runs first).
            use_tqdm: show a progress bar.
        Raises:
            ValueError: a bad prompt or parameter, a request past the request limits
                (``max_n``, ``max_logprobs``, ...), or ``max_tokens`` beyond what the
                context leaves after the prompt (no request is left behind).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._expand(sampling_params, len(prompts), "sampling_params")
        priorities = self._expand(priority, len(prompts), "priority", default=0)
        requests = [self._prepare(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        processor = OutputProcessor(self.tokenizer)
        order: dict[str, int] = {}
        engine_requests = []
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        for index, ((prompt_text, prompt_ids), params, prio) in enumerate(
                zip(requests, params_list, priorities, strict=True)):
            self.request_limits.check(params)
            self.engine.scheduler.check_prompt(prompt_ids)  # names the prompt before max_tokens
            params.verify_max_tokens(len(prompt_ids), self.engine.max_model_len)
            if params.structured_outputs is not None:
                # Compiled here, once per spec: no step waits for it later.
                self.engine.runner.structured_outputs.check(params.structured_outputs)
            parent_id = str(next(self._counter))
            order[parent_id] = index
            children = processor.add(parent_id, prompt_text, prompt_ids, params)
            engine_requests += [self.engine.make_request(child.req_id, prompt_ids, child.params,
                                                         prio, self._extra_stop_ids)
                                for child in children]
        for request in engine_requests:
            self.engine.add_request(request)
        return self._run(processor, order, use_tqdm)

    def _run(self, processor: OutputProcessor, order: dict[str, int],
             use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        profiler = self._start_profiler()
        try:
            # The heap as it stands sits out the collector's full collections while the
            # steps run (gridllm.common.heap: with a large batch one came every few hundred
            # steps and left the GPU idle for a quarter of a second).
            with frozen_heap():
                while self.engine.has_unfinished_requests():
                    updates = self.engine.step()
                    finished, stopped = processor.process(updates)
                    if stopped:
                        self.engine.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
                    for output in finished:
                        results[order[output.request_id]] = output
                    bar.update(len(finished))
                    if profiler is not None:
                        profiler.step()
        except BaseException:
            self.engine.abort_requests([r for r in list(self.engine.scheduler.requests)])
            raise
        finally:
            bar.close()
            self._stop_profiler(profiler)
        return [r for r in results if r is not None]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = True,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list) and generate.

        Args:
            tools: OpenAI function tools the template renders (a template that knows no
                tools gets them described in a system turn, see ``gridllm.common.chat_tools``);
                to force a call, constrain the reply with ``structured_outputs``.
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM has none.")
        conversations = ([messages] if messages and isinstance(messages[0], dict)
                         else messages)
        prompts: list[PromptType] = [
            {"prompt_token_ids": apply_chat_template(self.tokenizer, conv,  # type: ignore[arg-type]
                                                     add_generation_prompt, tools)}
            for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _expand(value: Any, count: int, name: str, default: Any = None) -> list[Any]:
        if value is None:
            value = SamplingParams() if name == "sampling_params" else default
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} must have one entry per prompt ({count}), "
                                 f"got {len(value)}.")
            return list(value)
        return [value] * count

    def _prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params)!r}.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass "
                                 "{'prompt_token_ids': [...]} instead.")
            if not prompt:
                raise ValueError("prompt must not be empty.")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of ints.")
            return prompt.get("prompt"), list(ids)
        raise ValueError("each prompt must be a str or a dict with 'prompt_token_ids'.")

    def _start_profiler(self) -> Any:
        if not self.profile_dir:
            return None
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if self.engine.runner.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        profiler = tp.profile(activities=activities, record_shapes=True, profile_memory=True,
                              with_stack=True)
        profiler.__enter__()
        return profiler

    def _stop_profiler(self, profiler: Any) -> None:
        if profiler is None:
            return
        profiler.__exit__(None, None, None)
        os.makedirs(self.profile_dir, exist_ok=True)  # type: ignore[arg-type]
        path = os.path.join(self.profile_dir, f"trace-{os.getpid()}-{next(self._counter)}.json")  # type: ignore[arg-type]
        profiler.export_chrome_trace(path)
        logger.info("profiler trace written to %s", path)
