"""FP8 (e4m3) weights and KV cache: the ``quantization`` and ``kv_cache_dtype`` settings.

Weights (``quantization="fp8"``): each linear layer of the decoder blocks (merged q/k/v,
o, merged gate/up, down; never the embeddings or the LM head) is replaced at load by an
``Fp8Linear`` holding float8_e4m3fn weights with one float32 scale per output channel
(``amax(|row|) / 448``, computed from the bf16/fp32 checkpoint as it streams in:
``worker_svc.layers.fp8_checkpoint.quantized_at_load``; ``quantize_weights`` does the same
to a model already built in its dtype, as the random-weight presets are).

The product depends on how many rows (tokens) a call has:
- up to ``WEIGHT_ONLY_MAX_ROWS`` (decode at small batches, where reading W is the cost):
  the activations stay in the model's dtype and only W is e4m3; on a CUDA GPU of compute
  capability 8.9+ one Triton kernel reads the e4m3 weight: the GEMV (``kernels.gemv``) up
  to ``ops.GEMV_MAX_ROWS`` rows, on 9.0+ with bfloat16 activations the tensor-core GEMV
  (``kernels.fp8_mma_gemv``, SiLU-and-mul in its epilogue for gate/up) up to 8, a
  ``tl.dot`` kernel (``kernels.fp8_gemv``) beyond;
- more rows: the activations are quantized per token too (``amax(|x_t|) / 448``, one Triton
  kernel on CUDA) and, on 8.9+ with bfloat16 activations, multiplied by one
  ``torch._scaled_mm`` with row-wise scales, or on 9.0+ where cuBLAS's tiles would leave
  SMs idle (a decode batch of up to a few hundred rows times a narrow layer) by the
  64 x 64-tile kernel ``kernels.fp8_gemm`` (``fp8_gemm.uses_tiles``), both on 9.0+ with the
  FP8 tensor cores' fast accumulation (as vLLM's FP8 GEMMs). Where the input is
  made by an RMSNorm or SiLU-and-mul kernel (the q/k/v, gate/up and down projections of a
  Llama decoder), that kernel writes the e4m3 rows and their scales instead
  (``forward_rms_norm``, ``forward_silu_and_mul_input``): one launch and one pass over
  the row fewer, the same values (the norm's sum of squares may add in another order:
  ``kernels.rms_norm.rms_norm_quant_fp8``).
Elsewhere (CPU, older GPUs, other dtypes) the same operands are dequantized and multiplied
in float32 (fake quantization), so CPU tests measure the accuracy of the quantized model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from kernels.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8
from kernels.fp8_gemm import fp8_gemm, tile_sms, uses_tiles
from kernels.fp8_gemv import MAX_ROWS as WEIGHT_ONLY_MAX_ROWS
from kernels.fp8_gemv import fp8_weight_matmul
from kernels.fp8_mma_gemv import MAX_ROWS as MMA_GEMV_MAX_ROWS
from kernels.fp8_mma_gemv import fp8_mma_gemv
from kernels.fp8_mma_gemv import serves as mma_gemv_serves
from kernels.fp8_quant import per_token_quant_fp8
from kernels.gemv import gemv
from kernels.rms_norm import rms_norm_quant_fp8
from kernels.silu_and_mul import silu_and_mul_quant_fp8
from worker_svc.layers import ops

logger = logging.getLogger(__name__)

# kv_cache_dtype's FP8 names (vLLM's, SGLang's, TGI's fp8_e4m3fn) and their element types.
FP8_KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                       "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# The decoder's linear layers quantized by quantization="fp8" (the Llama family's names).
FP8_LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# 1 / 448 (a float32 once multiplied with a float32 tensor, on every device).
INV_FP8_MAX = 1.0 / FP8_MAX
# Floor of a scale, so an all-zero row or token quantizes to zeros instead of NaN.
_MIN_SCALE = 1e-12


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device,
                         backend_name: str) -> torch.dtype:
    """The KV cache's element type for ``CacheConfig.kv_cache_dtype``.

    Raises:
        ValueError: an unknown name, or FP8 with the Triton backend on a GPU without
            FP8 conversions (compute capability below 8.9).
    """
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in FP8_KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto' or one of "
                         f"{tuple(FP8_KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}.")
    if device.type == "cuda" and backend_name == "triton":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs a GPU of compute "
                             f"capability 8.9+ (Ada, Hopper) for the triton attention "
                             f"backend, got {capability[0]}.{capability[1]}; use "
                             "attention_backend='torch'.")
    return FP8_KV_CACHE_DTYPES[kv_cache_dtype]


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q[i] = x[i] / scale[i]`` in e4m3 and ``scale[i] =
    amax(|x[i]|) / 448`` (``[rows, 1]`` float32): per output channel for a weight, per
    token for activations.

    The division by 448 is a float32 multiplication by ``1 / 448``: torch on CUDA computes a
    tensor-by-scalar division that way (and on the CPU as a true division), so spelling it
    out gives the same scales on both devices and in the Triton kernel.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax * INV_FP8_MAX).clamp(min=_MIN_SCALE)
    return quantize_fp8(x, scale), scale


def _has_fp8_conversions(weight: torch.Tensor) -> bool:
    """e4m3 loads and conversions in Triton kernels: CUDA compute capability 8.9+."""
    return weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 9)


def _can_use_scaled_mm(weight: torch.Tensor) -> bool:
    """FP8 tensor-core GEMMs: CUDA 8.9+, and both weight dims multiples of 16."""
    return (_has_fp8_conversions(weight) and hasattr(torch, "_scaled_mm")
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W in e4m3 (per-output-channel scales) and x quantized per
    token at each call.

    Args:
        weight: ``[out, in]`` float8_e4m3fn.
        weight_scale: ``[out]`` float32.
        bias: ``[out]`` or None (kept in the layer's dtype).
        reduce: applied to the output (a row-parallel layer's all-reduce over the
            tensor-parallel ranks); None: nothing.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.reduce = reduce
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # Decided once here: forward stays free of host queries (CUDA-graph capture).
        self.is_scaled_mm = _can_use_scaled_mm(weight)
        self.is_fp8_native = _has_fp8_conversions(weight)
        # SMs for the tiled FP8 GEMM (0: this weight never takes it).
        self.tile_sms = tile_sms(weight) if self.is_scaled_mm else 0
        # cuBLAS's fast accumulation where it was measured: Hopper (9.0+).
        self.fast_accum = (self.is_scaled_mm
                           and torch.cuda.get_device_capability(weight.device) >= (9, 0))
        # The dequantized weight of the fake-quantization path, built on first use.
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """The quantized form of ``linear``, or of one rank's shard of a tensor-parallel
        layer (a row-parallel shard keeps its bias on rank 0 and its all-reduce)."""
        weight, scale = quantize_per_row(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        tp = getattr(linear, "tp", None)
        reduce = None
        if tp is not None and tp.is_parallel and getattr(linear, "is_row_parallel", False):
            bias = bias if tp.rank == 0 else None
            reduce = tp.all_reduce
        return cls(weight, scale[:, 0].contiguous(), bias, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= WEIGHT_ONLY_MAX_ROWS:
            out = self._weight_only(x2)
        else:
            out = self._fp8_product(x2)
        if self.reduce is not None:
            out = self.reduce(out)
        return out.reshape(*shape[:-1], self.out_features)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu_and_mul(forward(x))`` for the merged ``[gate | up]`` projection: the gated
        MLP's gate/up projection and activation, one GEMV launch for a row on a GPU with
        e4m3 conversions."""
        x2 = x.reshape(-1, x.shape[-1])
        if not (self.is_fp8_native and 0 < x2.shape[0] <= MMA_GEMV_MAX_ROWS
                and self.reduce is None):
            return ops.silu_and_mul(self.forward(x))
        x2 = x2.contiguous()
        if x2.shape[0] <= ops.GEMV_MAX_ROWS:
            out = gemv(x2, self.weight, self.bias, self.weight_scale, silu_out=True)
        elif mma_gemv_serves(x2, self.weight, self.weight_scale):
            out = fp8_mma_gemv(x2, self.weight, self.weight_scale, self.bias, silu_out=True)
        else:
            return ops.silu_and_mul(self.forward(x))
        return out.reshape(*x.shape[:-1], self.out_features // 2)

    def quantizes_input(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` quantizes it per token with a Triton kernel, which a
        kernel producing ``x`` may then do instead (``forward_quantized``)."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return rows > WEIGHT_ONLY_MAX_ROWS and self.is_fp8_native and ops.uses_triton(x)

    def forward_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
        """``forward`` of rows already quantized per token (``x_q`` e4m3 ``[..., in]``,
        ``x_scale`` ``[rows, 1]`` float32, as ``per_token_quant_fp8`` makes them); the
        output in ``dtype``, the unquantized input's."""
        out = self._quantized_product(x_q.reshape(-1, self.in_features), x_scale, dtype)
        if self.reduce is not None:
            out = self.reduce(out)
        return out.reshape(*x_q.shape[:-1], self.out_features)

    def forward_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, norm,
                         silu_out: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(forward(norm(x + residual)), x + residual)`` where ``quantizes_input``: the
        norm kernel writes the e4m3 rows (``kernels.rms_norm.rms_norm_quant_fp8``), then
        the product; None elsewhere (and for a norm whose weight is not in ``x``'s dtype).
        ``silu_out``: ``silu_and_mul`` of the result (the merged gate/up projection)."""
        if not (self.quantizes_input(x) and norm.weight.dtype == x.dtype):
            return None
        x_q, x_scale, residual = rms_norm_quant_fp8(x, norm.weight, norm.eps, residual,
                                                    INV_FP8_MAX, _MIN_SCALE)
        out = self.forward_quantized(x_q, x_scale, x.dtype)
        return (ops.silu_and_mul(out) if silu_out else out), residual

    def forward_silu_and_mul_input(self, h: torch.Tensor) -> torch.Tensor:
        """``forward(silu_and_mul(h))`` (the down projection of a merged ``[gate | up]``
        ``h``): where ``quantizes_input``, one kernel computes the activation and its e4m3
        rows (``kernels.silu_and_mul.silu_and_mul_quant_fp8``)."""
        if not self.quantizes_input(h):  # h has the activation's rows
            return self.forward(ops.silu_and_mul(h))
        x_q, x_scale = silu_and_mul_quant_fp8(h, INV_FP8_MAX, _MIN_SCALE)
        return self.forward_quantized(x_q, x_scale, h.dtype)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows (decode): the activations stay unquantized; only W is e4m3."""
        if self.is_fp8_native:
            x = x.contiguous()
            if 0 < x.shape[0] <= ops.GEMV_MAX_ROWS:
                return gemv(x, self.weight, self.bias, self.weight_scale)
            if mma_gemv_serves(x, self.weight, self.weight_scale):
                return fp8_mma_gemv(x, self.weight, self.weight_scale, self.bias)
            return fp8_weight_matmul(x, self.weight, self.weight_scale, self.bias)
        return self._dequantized_product(x.float(), x.dtype)

    def _fp8_product(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill, large batches): activations quantized per token too."""
        if self.is_fp8_native:
            # One launch per layer: the torch expression is ~7 small kernels.
            x_q, x_scale = per_token_quant_fp8(x.contiguous(), INV_FP8_MAX, _MIN_SCALE)
        else:
            x_q, x_scale = quantize_per_row(x)
        return self._quantized_product(x_q, x_scale, x.dtype)

    def _quantized_product(self, x_q: torch.Tensor, x_scale: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
        """e4m3 rows ``x_q [M, in]`` with scales ``x_scale [M, 1]`` times W, in ``dtype``."""
        if self.is_scaled_mm and dtype == torch.bfloat16:
            if uses_tiles(x_q.shape[0], self.out_features, self.tile_sms):
                return fp8_gemm(x_q, x_scale, self.weight, self.weight_scale, self.bias, dtype)
            # Row-wise scales: scale_a [M, 1] per token, scale_b [1, N] per channel. Fast
            # accumulation, as fp8_gemm and vLLM's FP8 GEMMs (H200, Llama-3-8B gate/up:
            # 256 rows 55.6 -> 51.1 us, 64 rows 45.1 -> 40.1).
            return torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale,
                                    scale_b=self.weight_scale[None, :], bias=self.bias,
                                    out_dtype=dtype, use_fast_accum=self.fast_accum)
        return self._dequantized_product(dequantize_fp8(x_q, x_scale), dtype)

    def _dequantized_product(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fake quantization: float32 ``x`` times ``W * scale`` (built on first use), plus
        the bias, in ``dtype``."""
        if self._dequantized is None:
            self._dequantized = dequantize_fp8(self.weight, self.weight_scale[:, None])
        out = x @ self._dequantized.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel")


def quantize_weights(model: nn.Module, quantization: str | None) -> None:
    """Replace the model's decoder linear layers by their quantized form (in place).

    Raises:
        ValueError: an unknown method, or a model without all of ``FP8_LINEAR_NAMES``.
    """
    if quantization is None:
        return
    if quantization != "fp8":
        raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}.")
    targets = [(module, name) for module in model.modules()
               for name, child in module.named_children()
               if name in FP8_LINEAR_NAMES and isinstance(child, nn.Linear)]
    missing = set(FP8_LINEAR_NAMES) - {name for _, name in targets}
    if missing:
        # Another family (OPT's fc1/fc2, say) would be quantized only in part.
        raise ValueError(f"quantization='fp8' supports the Llama family (linear layers "
                         f"{', '.join(FP8_LINEAR_NAMES)}); {type(model).__name__} has no "
                         f"{', '.join(sorted(missing))}.")
    for module, name in targets:
        setattr(module, name, Fp8Linear.from_linear(getattr(module, name)))
    logger.info("quantization=fp8: %d linear layers hold float8_e4m3fn weights",
                len(targets))
