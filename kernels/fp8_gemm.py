"""``y = (x_q @ W_q^T) * s_x * s_w + b``: the FP8 GEMM with row-wise scales where few output
tiles would leave SMs idle.

``quantization="fp8"`` runs each linear layer of a batch past the weight-only kernel's rows
as an e4m3 x e4m3 product: activations quantized per token (``kernels.fp8_quant``), the
weight per output channel. cuBLAS (``torch._scaled_mm``) tiles that with 128 x 128 outputs,
so a decode batch of 256 rows times a 4096-channel projection (Llama-3-8B's o and down) is
64 tiles for 132 SMs on an H200. This kernel takes 64 x 64 tiles, 4 warps and 6 stages (64 x
128 tiles past 128 rows, 8 stages for a long K: ``config_for``); each tile's x and W are read
by bulk copies and multiplied by ``tl.dot`` on the tensor cores, the programs of one weight
tile run next to each other so that tile is read from memory once, and both scales and the
bias are applied to the sums. ``uses_tiles`` says where it serves: up to two tiles per SM.

Accumulation: Hopper's FP8 tensor cores keep ~14 mantissa bits while they add. Like vLLM's
FP8 GEMMs (CUTLASS's fast-accumulation schedules) and ``torch._scaled_mm(...,
use_fast_accum=True)``, which the FP8 layers call, the kernel leaves the sums there for the
whole K instead of moving them into float32 every ``BLOCK_K`` products: H200, Llama-3-8B at
256 rows, o 17.1 -> 14.1 us and down 41.2 -> 33.1 us; the largest error against the
float64 product, 1.2e-3 of the sum of the terms' magnitudes against 5.9e-4 (bf16 output
rounding included; e4m3 rounds each operand by up to 2^-4). Against cuBLAS (fast
accumulation too; docs/performance.md) as served: at 64 rows q/k/v 13.9 against 17.1 us, o
12.7 against 16.8, down 25.3 against 39.7; at 128 rows q/k/v 14.4 against 17.2, o 13.0
against 17.0, down 26.0 against 39.8; at 256 rows o 13.6 against 17.2, down 30.1 against
40.9. More tiles keep cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import capability, check_shape, check_tensor, is_interpreter, num_sms
from kernels.fp8 import FP8_DTYPE

try:  # host-side TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: cuBLAS only
    TensorDescriptor = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
Config = tuple[int, int, int, int, int]
DEFAULT_CONFIG: Config = (64, 64, 128, 4, 6)
# Past 128 rows: 64 x 128 tiles (H200, 256 rows: o 14.0 -> 13.6 us, down 32.7 -> 30.4).
_MANY_ROWS_CONFIG: Config = (64, 128, 128, 4, 6)
# Up to 128 rows and a long K (Llama-3-8B's down projection, 14336): eight stages (H200,
# 64 / 128 rows: 28.3 -> 25.3 / 30.0 -> 25.9 us). At K 4096 they measured mixed (q/k/v at
# 128 rows 14.4 -> 19.9 us), so shorter rows keep the default.
_LONG_K_CONFIG: Config = (64, 64, 128, 4, 8)
_LONG_K = 8192
# Output tiles per SM up to which the kernel beats cuBLAS's FP8 tiles.
_TILES_PER_SM = 2
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fp8_gemm_kernel(x_desc, w_desc, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr,
                     num_rows, num_out, num_in, stride_y, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row tiles vary fastest: the programs that read one weight tile run together.
    pid = tl.program_id(0)
    num_m = tl.cdiv(num_rows, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, num_in, BLOCK_K):
        # Out-of-range rows, channels and K read as zeros (the descriptors' bounds).
        x = x_desc.load([pid_m * BLOCK_M, k])
        w = w_desc.load([pid_n * BLOCK_N, k])
        # Fast accumulation (see the module's docstring): the tensor cores' sums carry over
        # the whole K.
        acc = tl.dot(x, w.T, acc)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < num_out
    x_scale = tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    out = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :],
             out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tile_sms(weight: torch.Tensor) -> int:
    """The SM count of ``weight``'s GPU where ``fp8_gemm`` can read it (compute capability
    9.0+, bulk copies, an e4m3 ``[N, K]`` weight with K in whole 16-byte rows and a
    16-byte aligned start), else 0. Asked once per layer (at load), not per call."""
    if (TensorDescriptor is None or weight.device.type != "cuda" or weight.dtype != FP8_DTYPE
            or weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] % 16
            or weight.data_ptr() % 16):
        return 0
    if capability(weight.device) < (9, 0):
        return 0
    return num_sms(weight.device)


def config_for(num_rows: int, num_in: int) -> Config:
    """The launch for ``num_rows`` rows of ``num_in`` columns (``benchmarks/fp8_gemm.py
    --sweep``, fast accumulation)."""
    if num_rows > 128:
        return _MANY_ROWS_CONFIG
    if num_in >= _LONG_K:
        return _LONG_K_CONFIG
    return DEFAULT_CONFIG


def uses_tiles(num_rows: int, num_out: int, sms: int) -> bool:
    """Whether ``fp8_gemm`` should take ``num_rows`` rows times ``num_out`` channels on a
    GPU of ``sms`` SMs (``tile_sms``; 0: never) instead of ``torch._scaled_mm``: at most
    ``_TILES_PER_SM`` output tiles of the default configuration per SM."""
    block_m, block_n = DEFAULT_CONFIG[:2]
    tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(num_out, block_n)
    return sms > 0 and tiles <= _TILES_PER_SM * sms


def fp8_gemm(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
             weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16, config: Config | None = None
             ) -> torch.Tensor:
    """``(x @ weight^T) * x_scale * weight_scale[None, :] + bias``; the sums in the FP8
    tensor cores' precision on a GPU (fast accumulation, see the module's docstring),
    float32 in Triton's CPU interpreter.

    Args:
        x: ``[M, K]`` float8_e4m3fn activations, contiguous (K a multiple of 16).
        x_scale: ``[M, 1]`` or ``[M]`` float32, per row of x.
        weight: ``[N, K]`` float8_e4m3fn, contiguous.
        weight_scale: ``[N]`` float32, per output channel.
        bias: ``[N]`` or None.
        out_dtype: bfloat16, float16 or float32.
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``; default
            ``config_for`` the shape (Triton's CPU interpreter: tiles of 32).
    Returns:
        ``[M, N]`` in ``out_dtype``.
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    check_tensor("x", x, ndim=2, dtypes=(FP8_DTYPE,), contiguous=True)
    num_rows, num_in = x.shape
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,), device=x.device,
                 contiguous=True)
    num_out = weight.shape[0]
    check_shape("weight", weight, (num_out, num_in))
    if num_in % 16:
        raise ValueError(f"x must have a multiple of 16 columns, got {num_in}.")
    for name, t in (("x", x), ("weight", weight)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address (bulk copies).")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), device=x.device,
                 contiguous=True)
    if x_scale.numel() != num_rows:
        raise ValueError(f"x_scale must have {num_rows} values (one per row of x), got "
                         f"shape {tuple(x_scale.shape)}.")
    check_tensor("weight_scale", weight_scale, ndim=1, dtypes=(torch.float32,),
                 device=x.device, contiguous=True)
    check_shape("weight_scale", weight_scale, (num_out,))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=OUT_DTYPES, device=x.device,
                     contiguous=True)
        check_shape("bias", bias, (num_out,))
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}.")
    y = torch.empty((num_rows, num_out), dtype=out_dtype, device=x.device)
    if num_rows == 0 or num_out == 0:
        return y
    if num_in == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand_as(y))
    if TensorDescriptor is None:  # pragma: no cover - an older Triton
        raise ValueError("fp8_gemm needs Triton's tensor descriptors (Triton 3.4+).")
    if config is None:
        config = (32, 32, 32, 4, 1) if is_interpreter() else config_for(num_rows, num_in)
    block_m, block_n, block_k, num_warps, num_stages = config
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_out, block_n),)
    _fp8_gemm_kernel[grid](
        x_desc, w_desc, x_scale, weight_scale, bias if bias is not None else y, y,
        num_rows, num_out, num_in, y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages)
    return y
