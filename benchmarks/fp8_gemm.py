"""Llama-3-8B's decoder linear layers at decode batches in FP8: cuBLAS against the tiled kernel.

Run on a CUDA GPU of compute capability 9.0+: ``python benchmarks/fp8_gemm.py [--rows
32,64,128,256,512]``. Per layer shape and row count: ``torch._scaled_mm`` with row-wise
scales (cuBLAS) and ``kernels.fp8_gemm`` (64 x 64 tiles) on the same per-token quantized
activations and per-channel e4m3 weight, each timed as one CUDA-graph replay after an L2
flush (``benchmarks.kernels.graph_bench``), in TFLOP/s; ``serves`` says which one
``uses_tiles`` picks, and the last column the per-token quantization of the input that
both need. ``--sweep`` also times other tile shapes of the kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import graph_bench  # noqa: E402
from kernels.fp8_gemm import DEFAULT_CONFIG, fp8_gemm, tile_sms, uses_tiles  # noqa: E402
from kernels.fp8_quant import per_token_quant_fp8  # noqa: E402
from worker_svc.layers.quantization import quantize_per_row  # noqa: E402

SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336)]
SWEEP = [(64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 128, 8, 4),
         (64, 64, 128, 4, 4), (64, 64, 64, 4, 8), (32, 64, 128, 4, 6),
         (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 256, 128, 4, 4),
         (128, 128, 64, 4, 6), (256, 128, 128, 8, 3), (64, 128, 128, 4, 6),
         (64, 64, 256, 4, 4), (64, 64, 128, 4, 8), (128, 64, 128, 8, 4), (64, 32, 128, 4, 6)]


def _time_shape(m: int, n: int, k: int, sweep: bool) -> tuple[float, float, float, bool]:
    """``(cuBLAS ms, tiled ms, quantization ms, whether the tiled kernel serves)``."""
    torch.manual_seed(0)
    w_q, w_scale = quantize_per_row(torch.randn(n, k, device="cuda") * 0.02)
    w_scale = w_scale[:, 0].contiguous()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x_q, x_scale = per_token_quant_fp8(x, 1.0 / 448.0, 1e-12)
    t_cublas = graph_bench(lambda: torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None, :], out_dtype=torch.bfloat16,
        use_fast_accum=True))
    t_tiled = graph_bench(lambda: fp8_gemm(x_q, x_scale, w_q, w_scale))
    t_quant = graph_bench(lambda: per_token_quant_fp8(x, 1.0 / 448.0, 1e-12))
    if sweep:
        for config in SWEEP:
            t = graph_bench(lambda c=config: fp8_gemm(x_q, x_scale, w_q, w_scale, config=c))
            print(f"    {config}: {t * 1e3:.1f} us")
    return t_cublas, t_tiled, t_quant, uses_tiles(m, n, tile_sms(w_q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="32,64,128,256,512")
    parser.add_argument("--sweep", action="store_true", help="also other tile shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fp8_gemm.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; default tiles "
          f"{DEFAULT_CONFIG}")
    print(f"{'layer':13s} {'M':>4s} {'cuBLAS us':>10s} {'tiled us':>9s} {'cuBLAS TF/s':>12s} "
          f"{'tiled TF/s':>11s} {'serves':>7s} {'quant us':>9s}")
    totals = {}
    for m in (int(r) for r in args.rows.split(",")):
        for name, n, k in SHAPES:
            t_cublas, t_tiled, t_quant, tiled = _time_shape(m, n, k, args.sweep)
            flops = 2 * m * n * k
            cublas_total, served_total = totals.get(m, (0.0, 0.0))
            totals[m] = (cublas_total + t_cublas, served_total + (t_tiled if tiled else t_cublas))
            print(f"{name:13s} {m:4d} {t_cublas * 1e3:10.1f} {t_tiled * 1e3:9.1f} "
                  f"{flops / t_cublas / 1e9:12.0f} {flops / t_tiled / 1e9:11.0f} "
                  f"{'tiled' if tiled else 'cuBLAS':>7s} {t_quant * 1e3:9.1f}")
    for m, (cublas_total, served_total) in totals.items():
        print(f"one decoder layer's four products at M={m}: cuBLAS {cublas_total * 1e3:.1f} us, "
              f"as served {served_total * 1e3:.1f} us")


if __name__ == "__main__":
    main()
