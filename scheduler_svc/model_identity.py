"""What a scheduler checks before it links a worker: that it serves the same model.

A scheduler's requests move between its workers (migration, prefix-cache routing) and its
block tables assume one block size, so every worker must run the same model (architecture
config and attention pattern, as the config hash covers them) in the same dtype, with the
same weight quantization, KV cache element type and source of an FP8 cache's scales (each
changes the outputs), and the same KV block size. The first worker linked fixes the identity (or the
scheduler's ``--model``, when given, fixes the name); a worker that differs is refused with a
log line naming what differs, and never gets a Step stream, so never a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridllm.v1 import worker_pb2


@dataclass(frozen=True)
class ModelIdentity:
    # Model name or path, as the worker was started with.
    model: str
    # Digest of the model's architecture config (gridllm.v1.WorkerInfo.model_config_hash).
    config_hash: str
    # Weight dtype, e.g. "bfloat16".
    dtype: str
    # Tokens per KV block.
    block_size: int
    # Weight quantization as served ("fp8" or empty) and KV cache element type.
    quantization: str = ""
    kv_cache_dtype: str = ""
    # Where an FP8 cache's scales come from ("calculated", "checkpoint" or empty).
    kv_cache_scales: str = ""

    @classmethod
    def of(cls, info: worker_pb2.WorkerInfo) -> ModelIdentity:
        return cls(info.model, info.model_config_hash, info.dtype, info.block_size,
                   info.quantization, info.kv_cache_dtype, info.kv_cache_scales)

    def differences(self, other: ModelIdentity) -> list[str]:
        """``field: ours != theirs`` for each field where ``other`` differs."""
        return [f"{name} {theirs!r} != {ours!r}"
                for name, ours, theirs in (("model", self.model, other.model),
                                           ("model config hash", self.config_hash,
                                            other.config_hash),
                                           ("dtype", self.dtype, other.dtype),
                                           ("block_size", self.block_size, other.block_size),
                                           ("quantization", self.quantization,
                                            other.quantization),
                                           ("kv_cache_dtype", self.kv_cache_dtype,
                                            other.kv_cache_dtype),
                                           ("kv_cache_scales", self.kv_cache_scales,
                                            other.kv_cache_scales))
                if ours != theirs]
