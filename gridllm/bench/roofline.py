"""Measured hardware limits and the weight-bandwidth roofline of batch-1 decode.

A batch-1 decode step must read every weight it uses once, so its time is at least
``decode weight bytes / memory bandwidth``. The bandwidth is measured, not taken from a data
sheet: a device-to-device copy of a large tensor, counting read + write bytes (what a
kernel streaming weights can reach). The bf16 matmul rate is measured too (an 8192^3 GEMM),
for the compute-bound side. On CPU both are reported as n/a.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _time_cuda_ms(fn, iters: int, warmup: int = 5) -> float:
    """Fastest milliseconds of ``fn`` over ``iters`` runs (CUDA events). The best run is
    the limit the hardware allows; medians drift with clocks and other processes."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def measure_copy_bandwidth_gbps(device: torch.device, num_bytes: int = 1 << 30,
                                iters: int = 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write bytes); None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_cuda_ms(lambda: dst.copy_(src), iters)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10,
                          dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense ``n x n x n`` matmul rate in TFLOP/s; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_cuda_ms(lambda: a @ b, iters)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters a decode step reads: all of them except embedding tables,
    of which a step reads one row per token (unless the table is tied to the LM head)."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    skipped = {id(m.weight) for m in model.modules()
               if isinstance(m, nn.Embedding) and id(m.weight) not in linear_weights}
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or id(param) in skipped:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def meta_model(model: str, dtype: torch.dtype, quantization: str | None = None
               ) -> tuple[nn.Module, Any]:
    """``(gridllm model on the meta device, HF config)`` of a model name (no memory); with
    ``quantization`` or an FP8 checkpoint, its FP8 layers (one byte a weight)."""
    import os

    from gridllm.common.random_presets import is_random_model, random_model_config
    from worker_svc.layers.fp8_checkpoint import fp8_checkpoint, stores_fp8_weights
    from worker_svc.layers.quantization import quantize_weights
    from worker_svc.loader import resolve_model_path
    from worker_svc.models import get_model_class
    from worker_svc.torch_utils import default_dtype

    if is_random_model(model):
        hf_config = random_model_config(model)
    else:
        from transformers import AutoConfig

        path = resolve_model_path(model)
        if not os.path.isdir(path):
            raise ValueError(f"weight bytes need an HF directory or a preset, got {model!r}.")
        hf_config = AutoConfig.from_pretrained(path)
    with default_dtype(dtype), torch.device("meta"):
        built = get_model_class(hf_config.architectures[0])(hf_config, None)
    fp8 = stores_fp8_weights(fp8_checkpoint(hf_config)) or quantization == "fp8"
    quantize_weights(built, "fp8" if fp8 else None)
    return built, hf_config


def model_decode_weight_bytes(model: str, dtype: torch.dtype,
                              quantization: str | None = None) -> int:
    """``decode_weight_bytes`` of a model name, built on the meta device (no memory)."""
    return decode_weight_bytes(meta_model(model, dtype, quantization)[0])


def measure_limits(device: torch.device) -> dict[str, Any]:
    """The card's name, copy bandwidth and bf16 matmul rate (None values on CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "copy_bandwidth_gbps": measure_copy_bandwidth_gbps(device),
            "bf16_matmul_tflops": measure_matmul_tflops(device)}


def roofline(weight_bytes: int, limits: dict[str, Any], num_gpus: int = 1) -> dict[str, Any]:
    """Batch-1 decode bound: ``tokens/s <= num_gpus x bandwidth / weight_bytes``.

    Args:
        weight_bytes: ``decode_weight_bytes`` of the whole model.
        limits: ``measure_limits``'s result (one card).
        num_gpus: cards the weights are split over (tensor parallelism): each reads its
            share at the same time.
    Returns:
        The limits plus ``weight_bytes``, ``num_gpus``, ``roofline_ms_per_token`` and
        ``roofline_tokens_per_s`` (None without a measured bandwidth).
    """
    bandwidth = limits.get("copy_bandwidth_gbps")
    result = {**limits, "weight_bytes": weight_bytes, "num_gpus": num_gpus,
              "roofline_ms_per_token": None, "roofline_tokens_per_s": None}
    if bandwidth:
        bandwidth *= num_gpus
        result["roofline_ms_per_token"] = weight_bytes / (bandwidth * 1e9) * 1e3
        result["roofline_tokens_per_s"] = bandwidth * 1e9 / weight_bytes
    return result
