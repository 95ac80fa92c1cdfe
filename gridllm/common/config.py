"""One dataclass per component, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass

_POLICIES = ("fcfs", "priority")
_BLOCK_RESERVATIONS = ("none", "predicted")
_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _require(ok: bool, name: str, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {message}, got {value!r}.")


@dataclass
class SchedulerConfig:
    # Most requests in one step.
    max_num_seqs: int = 256
    # Most tokens (prompt chunks + decodes) in one step.
    max_num_batched_tokens: int = 2048
    # Longest prompt + completion a request may reach.
    max_model_len: int = 2048
    # Split long prompts over several steps; off means a prompt is scheduled whole.
    enable_chunked_prefill: bool = True
    # "fcfs" or "priority" (lower value first, arrival breaks ties).
    policy: str = "fcfs"
    # "none": admit a request once its prompt fits; "predicted": also keep KV room for the
    # predicted output of every running request (fewer preemptions under KV pressure).
    block_reservation: str = "none"
    # Slack on the predicted length when reserving ("predicted" only): 0.1 is 10% more.
    prefetch_ratio: float = 0.1

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be at least 1", self.max_num_seqs)
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 "must be at least 1", self.max_num_batched_tokens)
        _require(self.max_model_len >= 1, "max_model_len", "must be at least 1", self.max_model_len)
        _require(self.policy in _POLICIES, "scheduling_policy", f"must be one of {_POLICIES}",
                 self.policy)
        _require(self.block_reservation in _BLOCK_RESERVATIONS, "block_reservation",
                 f"must be one of {_BLOCK_RESERVATIONS}", self.block_reservation)
        _require(isinstance(self.prefetch_ratio, (int, float)) and 0.0 <= self.prefetch_ratio
                 <= 10.0, "prefetch_ratio", "must be in [0, 10]", self.prefetch_ratio)
        if not self.enable_chunked_prefill:
            _require(self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens",
                     f"must be at least max_model_len={self.max_model_len} without chunked "
                     "prefill", self.max_num_batched_tokens)


@dataclass
class CacheConfig:
    # Tokens per KV block.
    block_size: int = 16
    # Number of KV blocks; None sizes the pool from memory (kv_cache_memory or free GPU memory).
    num_kv_blocks: int | None = None
    # Bytes for the KV cache on CPU when num_kv_blocks is None.
    kv_cache_memory: int = 1 << 30
    # Fraction of GPU memory the worker may use (weights + activations + KV cache).
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                 "block_size", "must be a power of two", self.block_size)
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
                 "must be at least 1", self.num_kv_blocks)
        _require(self.kv_cache_memory > 0, "kv_cache_memory", "must be positive",
                 self.kv_cache_memory)
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 "must be in (0, 1]", self.gpu_memory_utilization)


@dataclass
class ModelConfig:
    # HF directory, GGUF file, a preset name ("smollm2-135m") or "random:<preset>".
    model: str
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    # "auto": bfloat16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    # "auto": CUDA if available, else CPU.
    device: str = "auto"
    # None: the model's own limit (max_position_embeddings).
    max_model_len: int | None = None
    # "auto": triton on CUDA, torch on CPU.
    attention_backend: str = "auto"
    # Capture no CUDA graphs.
    enforce_eager: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and bool(self.model), "model",
                 "must be a non-empty path or name", self.model)
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}", self.dtype)
        _require(self.attention_backend in ("auto", "torch", "triton"), "attention_backend",
                 "must be one of ('auto', 'torch', 'triton')", self.attention_backend)
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                 "must be at least 1", self.max_model_len)
