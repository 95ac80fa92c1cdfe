"""One dataclass per component, validated where it is built.

Each field is declared once, with its default and help: the services' flags, ``gridllm up``
and ``gridllm run`` are generated from these declarations (``cli_args``), and the keyword
arguments of ``LLM(...)`` are their field names (``engine_configs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gridllm.common.cli_args import option, parse_size

_POLICIES = ("fcfs", "priority")
_BLOCK_RESERVATIONS = ("none", "predicted")
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_ATTENTION_BACKENDS = ("auto", "torch", "triton")
# KV cache element types (vLLM's and SGLang's names, and TGI's fp8_e4m3fn): auto is the
# model's dtype; fp8 and fp8_e4m3fn are aliases of fp8_e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e4m3fn", "fp8_e5m2")
# Weight quantization (vLLM's names): fp8 quantizes a float checkpoint at load (an FP8
# checkpoint is served as stored with it or without); the others name FP8 checkpoints'
# layouts and only check that the checkpoint is one (it is served as stored either way).
QUANTIZATIONS = ("fp8", "compressed-tensors", "fbgemm_fp8")

# What `gridllm up` and `gridllm run` serve when no --model is given.
DEFAULT_MODEL = "smollm2-135m"
# The router's port: where clients dial by default.
DEFAULT_ROUTER_PORT = 50051
# The router's OpenAI-compatible HTTP port under `gridllm up`.
DEFAULT_HTTP_PORT = 8000
# Seconds a worker's or scheduler's registry entry outlives its last heartbeat in Redis.
HEARTBEAT_TTL_S = 6.0
# The SchedulerConfig fields a worker is sized by (its CUDA graphs, its profiling forward).
WORKER_SIZING_FIELDS = ("max_num_seqs", "max_num_batched_tokens")
# The ModelConfig fields a worker takes no flag for: it loads no tokenizer.
WORKER_MODEL_EXCLUDED = ("tokenizer", "skip_tokenizer_init")


def require(ok: bool, name: str, message: str, value: object) -> None:
    """ValueError ``"<name> <message>, got <value>."`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} {message}, got {value!r}.")


def check_port(port: int, name: str = "port") -> None:
    require(isinstance(port, int) and 0 <= port <= 65535, name, "must be in [0, 65535]", port)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for: bounds on the sizes a hostile or mistaken request could
    blow up (n completions, logprobs per position, stop lists, logit_bias entries).

    The scheduler admits only requests within its limits and reports them to the router,
    which checks them before any work is done; ``LLM`` checks its scheduler config's.
    """

    max_n: int = 128
    max_logprobs: int = 20
    max_num_stop_strings: int = 64
    max_stop_string_len: int = 512
    max_num_stop_token_ids: int = 1024
    max_num_logit_bias: int = 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f.name, "must be an integer of at least 1", value)

    def check(self, params: Any) -> None:
        """ValueError naming the field (and the limit) a SamplingParams exceeds."""
        _within(params.n, self.max_n, "n", "completions", "max_n")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None:
                _within(value, self.max_logprobs, name, "log-probabilities per position",
                        "max_logprobs")
        stop = params.stop or []
        _within(len(stop), self.max_num_stop_strings, "stop", "strings",
                "max_num_stop_strings")
        longest = max(stop, key=len, default="")
        if len(longest) > self.max_stop_string_len:
            raise ValueError(f"stop strings must be at most {self.max_stop_string_len} "
                             f"characters (max_stop_string_len), got one of {len(longest)}.")
        _within(len(params.stop_token_ids or []), self.max_num_stop_token_ids,
                "stop_token_ids", "ids", "max_num_stop_token_ids")
        _within(len(params.logit_bias or {}), self.max_num_logit_bias, "logit_bias",
                "entries", "max_num_logit_bias")


def _within(value: int, limit: int, name: str, what: str, limit_name: str) -> None:
    if value > limit:
        raise ValueError(f"{name} must be at most {limit} {what} ({limit_name}), got {value}.")


_LIMITS = RequestLimits()


@dataclass
class SchedulerConfig:
    max_num_seqs: int = option(256, help="most requests in one step")
    max_num_batched_tokens: int = option(
        2048, help="most tokens (prompt chunks + decodes) in one step: bounds how long one "
        "step (and so every stream's next token) can take while a long prompt is prefilled")
    enable_chunked_prefill: bool = option(
        True, help="split long prompts over several steps; off: a prompt is scheduled whole")
    enable_prefix_caching: bool = option(
        True, help="reuse the KV blocks of a prompt prefix seen before")
    scheduling_policy: str = option(
        "fcfs", choices=_POLICIES,
        help="fcfs, or priority (lower value first, arrival breaks ties)")
    block_reservation: str = option(
        "none", choices=_BLOCK_RESERVATIONS,
        help="none: admit a request once its prompt fits; predicted: also keep KV room for "
        "the predicted output of every running request (fewer preemptions under KV pressure)")
    prefetch_ratio: float = option(
        0.1, help="slack on the predicted output length when reserving (predicted only): "
        "0.1 is 10%% more")
    # What one request may ask for (RequestLimits): the scheduler refuses more with
    # INVALID_ARGUMENT naming the field and reports them to the router, which checks first.
    max_n: int = option(_LIMITS.max_n, help="most completions (n) one request may ask for")
    max_logprobs: int = option(
        _LIMITS.max_logprobs, help="most log-probabilities per position a request may ask "
        "for (logprobs and prompt_logprobs)")
    max_num_stop_strings: int = option(
        _LIMITS.max_num_stop_strings, help="most stop strings in one request")
    max_stop_string_len: int = option(
        _LIMITS.max_stop_string_len, help="longest stop string, in characters")
    max_num_stop_token_ids: int = option(
        _LIMITS.max_num_stop_token_ids, help="most stop_token_ids in one request")
    max_num_logit_bias: int = option(
        _LIMITS.max_num_logit_bias, help="most logit_bias entries in one request")

    def __post_init__(self) -> None:
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be at least 1", self.max_num_seqs)
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                "must be at least 1", self.max_num_batched_tokens)
        require(self.scheduling_policy in _POLICIES, "scheduling_policy",
                f"must be one of {_POLICIES}", self.scheduling_policy)
        require(self.block_reservation in _BLOCK_RESERVATIONS, "block_reservation",
                f"must be one of {_BLOCK_RESERVATIONS}", self.block_reservation)
        require(isinstance(self.prefetch_ratio, (int, float))
                and 0.0 <= self.prefetch_ratio <= 10.0, "prefetch_ratio", "must be in [0, 10]",
                self.prefetch_ratio)
        self.request_limits()  # names a bad limit

    def request_limits(self) -> RequestLimits:
        """The request limits among these settings."""
        return RequestLimits(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(RequestLimits)})

    def check_model_len(self, max_model_len: int) -> None:
        """ValueError if a request of ``max_model_len`` tokens could never be scheduled."""
        if not self.enable_chunked_prefill:
            require(self.max_num_batched_tokens >= max_model_len, "max_num_batched_tokens",
                    f"must be at least max_model_len={max_model_len} without chunked prefill",
                    self.max_num_batched_tokens)


@dataclass
class CacheConfig:
    block_size: int = option(16, help="tokens per KV block (a power of two)")
    num_kv_blocks: int | None = option(
        None, default_help="sized from memory",
        help="KV blocks per worker (overrides the sizing from memory)")
    kv_cache_memory: int = option(
        1 << 30, is_size=True, help="bytes of KV cache per worker on CPU (units: 1GiB, 512MB)")
    gpu_memory_utilization: float = option(
        0.9, metavar="FRACTION",
        help="fraction of GPU memory a worker may use (weights + activations + KV cache)")
    kv_cache_dtype: str = option(
        "auto", choices=KV_CACHE_DTYPES,
        help="KV cache element type: auto (the model's dtype), fp8 / fp8_e4m3 (float8 e4m3 "
        "with a per-tensor scale: twice the blocks per GiB of bfloat16) or fp8_e5m2 (float8 "
        "e5m2: the range of float16, one mantissa bit fewer than e4m3)")
    calculate_kv_scales: bool = option(
        False, help="with an FP8 KV cache: compute each layer's KV-cache scales at load from "
        "a fixed calibration text (replacing a checkpoint's); without it, a checkpoint's "
        "calibrated scales or 1.0")

    def __post_init__(self) -> None:
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                f"must be one of {KV_CACHE_DTYPES}", self.kv_cache_dtype)
        require(not self.calculate_kv_scales or self.kv_cache_dtype != "auto",
                "calculate_kv_scales", "needs an FP8 KV cache (kv_cache_dtype='fp8')",
                self.calculate_kv_scales)
        self.kv_cache_memory = parse_size(self.kv_cache_memory, "kv_cache_memory")
        require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                "block_size", "must be a power of two", self.block_size)
        require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
                "must be at least 1", self.num_kv_blocks)
        require(self.kv_cache_memory > 0, "kv_cache_memory", "must be positive",
                self.kv_cache_memory)
        require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                "must be in (0, 1]", self.gpu_memory_utilization)


SPARSE_PATTERNS = ("local", "strided")


def parse_sparse_attention(value: str | None) -> tuple[str, int] | None:
    """``"local:W"`` / ``"strided:S"`` as ``(pattern, size)``; None stays None.

    Raises:
        ValueError: naming ``sparse_attention``, for any other value.
    """
    if value is None:
        return None
    pattern, _, size = str(value).partition(":")
    if pattern not in SPARSE_PATTERNS or not size.isdigit() or int(size) < 1:
        raise ValueError(f"sparse_attention must be 'local:W' or 'strided:S' with a positive "
                         f"integer size, got {value!r}.")
    return pattern, int(size)


@dataclass
class ModelConfig:
    model: str = option(help="preset name (smollm2-135m), HF directory, GGUF file or "
                             "random:<preset>")
    tokenizer: str | None = option(None, default_help="the model's",
                                   help="tokenizer directory")
    skip_tokenizer_init: bool = option(
        False, help="load no tokenizer: token-id prompts only, no text")
    dtype: str = option("auto", choices=_DTYPES,
                        help="weight and KV dtype; auto: bfloat16 on CUDA, float32 on CPU")
    device: str = option("auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    max_model_len: int | None = option(
        None, default_help="the model's",
        help="longest prompt + completion in tokens (at most the model's own limit)")
    attention_backend: str = option(
        "auto", choices=_ATTENTION_BACKENDS, help="auto: triton on CUDA, torch on CPU")
    enforce_eager: bool = option(False, help="capture no CUDA graphs")
    quantization: str | None = option(
        None, choices=QUANTIZATIONS, default_help="none",
        help="weight quantization at load: fp8 (per-channel float8 e4m3 weights of the "
        "Llama family's linear layers, activations quantized per token); an FP8 "
        "checkpoint (quantization_config in config.json) is served as stored without it "
        "(compressed-tensors, fbgemm_fp8: check that the checkpoint is one)")
    seed: int = option(0, help="seed of the engine's random generator")
    sparse_attention: str | None = option(
        None, default_help="none: the model's own attention",
        help="a sparse pattern on the layers without a window of their own (approximates "
             "the model): local:W (the W latest tokens; frees the KV blocks before them "
             "when every layer is local) or strided:S (the S latest tokens and every S-th "
             "before them)")
    tensor_parallel_size: int = option(
        1, help="devices one worker (or LLM) shards the model across, one process each: "
        "attention heads, MLP and vocabulary split Megatron-style (every supported "
        "architecture)")

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and bool(self.model), "model",
                "must be a non-empty path or name", self.model)
        parse_sparse_attention(self.sparse_attention)
        require(isinstance(self.tensor_parallel_size, int)
                and not isinstance(self.tensor_parallel_size, bool)
                and self.tensor_parallel_size >= 1, "tensor_parallel_size",
                "must be an integer of at least 1", self.tensor_parallel_size)
        require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}", self.dtype)
        require(self.attention_backend in _ATTENTION_BACKENDS, "attention_backend",
                f"must be one of {_ATTENTION_BACKENDS}", self.attention_backend)
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                "must be at least 1", self.max_model_len)
        require(self.quantization is None or self.quantization in QUANTIZATIONS,
                "quantization", f"must be None or one of {QUANTIZATIONS}", self.quantization)


_ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig)


def engine_configs(model: str, /, **kwargs: Any
                   ) -> tuple[ModelConfig, CacheConfig, SchedulerConfig]:
    """The engine's three configs from one flat set of keyword arguments (``LLM``'s).

    Each argument goes to the config with a field of its name.

    Raises:
        ValueError: an argument no config has (naming it), or a bad value.
    """
    owners = {f.name: cls for cls in _ENGINE_CONFIGS for f in dataclasses.fields(cls)}
    unknown = sorted(name for name in kwargs if name not in owners or name == "model")
    if unknown:
        accepted = ", ".join(sorted(set(owners) - {"model"}))
        raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; "
                         f"accepted: {accepted}.")
    split: dict[type, dict[str, Any]] = {cls: {} for cls in _ENGINE_CONFIGS}
    for name, value in kwargs.items():
        split[owners[name]][name] = value
    return (ModelConfig(model, **split[ModelConfig]), CacheConfig(**split[CacheConfig]),
            SchedulerConfig(**split[SchedulerConfig]))
