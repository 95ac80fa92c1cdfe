"""Llama-3-8B's decoder linear layers in bf16 and FP8, at decode and prefill batch sizes.

Run on a CUDA GPU of compute capability 8.9+: ``python benchmarks/fp8_linear.py``. For each
layer shape (merged q/k/v, o, merged gate/up, down) and number of rows M it prints the
median time (CUDA events, L2 flushed) of:

- ``bf16``: ``F.linear`` on bfloat16 weights (cuBLAS);
- ``fp8 mm``: per-token activation quantization (one Triton kernel) + ``torch._scaled_mm``
  with row-wise scales, what ``Fp8Linear`` runs above ``WEIGHT_ONLY_MAX_ROWS`` rows;
- ``fp8 w-only``: the e4m3-weight kernel (``kernels.fp8_gemv``), what it runs up to that
  many rows, in its default configuration (a sweep of tile configurations at M = 1 and 16
  prints each one's time first);
and the weight bytes read per second as a fraction of the copy bandwidth measured in the
same run. The last table sums the four layers: the decoder's linear time per token of one
Llama-3-8B block, times 32 blocks.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels.fp8_gemv import (  # noqa: E402
    DEFAULT_CONFIG,
    MAX_ROWS,
    fp8_weight_matmul,
)
from kernels.fp8_quant import per_token_quant_fp8  # noqa: E402
from worker_svc.layers.quantization import INV_FP8_MAX, quantize_per_row  # noqa: E402

# name, out features, in features (Llama-3-8B).
SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336)]
NUM_LAYERS = 32
# Tile configurations of the weight-only kernel tried (at M = 1 and M = 16).
DOT_SWEEP = list(itertools.product((32,), (128, 256), (4,), (4,), (1, 2, 4, 8))) + [
    (16, 256, 4, 4, 1), (16, 256, 4, 4, 4), (64, 256, 4, 3, 4), (32, 512, 4, 3, 4),
    (32, 256, 8, 4, 4)]


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _fp8_mm(x, q, s):
    x_q, x_s = per_token_quant_fp8(x, INV_FP8_MAX, 1e-12)
    return torch._scaled_mm(x_q, q.t(), scale_a=x_s, scale_b=s[None, :],
                            out_dtype=torch.bfloat16)


def _sweep(weights, configs, num_rows: int):
    """The configuration with the least time summed over the four shapes at ``num_rows``."""
    times = {}
    for config in configs:
        total = 0.0
        try:
            for name, _, k in SHAPES:
                _, q, s = weights[name]
                x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
                total += bench(functools.partial(fp8_weight_matmul, x, q, s, config=config))
        except Exception as exc:  # a configuration Triton cannot build: skip it
            print(f"config {config}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        times[config] = total
        print(f"config {config}: {total * 1e3:8.1f} us for the 4 shapes at M={num_rows}")
    return min(times, key=times.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,2,4,8,16,64,256", help="values of M")
    parser.add_argument("--no-sweep", action="store_true",
                        help="time only the default weight-only configuration")
    parser.add_argument("--output", default=None, help="write results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fp8_linear.py needs a CUDA GPU")
    limits = measure_limits(torch.device("cuda"))
    copy_gbps = limits["copy_bandwidth_gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows_list = [int(r) for r in args.rows.split(",")]
    results = {"device": torch.cuda.get_device_name(), "limits": limits, "rows": []}
    weights = {}
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s = quantize_per_row(w)
        weights[name] = (w, q, s[:, 0].contiguous())
    configs = [DEFAULT_CONFIG] if args.no_sweep else DOT_SWEEP
    best_1 = _sweep(weights, configs, 1)
    best_16 = _sweep(weights, configs, MAX_ROWS)
    results["best_config"] = {"1": list(best_1), str(MAX_ROWS): list(best_16)}
    print(f"best config at M=1 {best_1}, at M={MAX_ROWS} {best_16} (default {DEFAULT_CONFIG})")
    best = dict(config=DEFAULT_CONFIG)
    print(f"{'layer':14s} {'M':>4s} {'bf16 us':>9s} {'fp8 mm us':>10s} {'w-only us':>10s} "
          f"{'bf16 %BW':>9s} {'fp8 used %BW':>13s}")
    per_token = {m: [0.0, 0.0, 0.0] for m in rows_list}
    for name, n, k in SHAPES:
        w, q, s = weights[name]
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(functools.partial(torch.nn.functional.linear, x, w))
            t_mm = bench(functools.partial(_fp8_mm, x, q, s))
            t_wo = bench(functools.partial(fp8_weight_matmul, x, q, s, **best)) \
                if m <= MAX_ROWS else float("nan")
            t_fp8 = t_wo if m <= MAX_ROWS else t_mm  # what Fp8Linear runs
            pct_bf16 = n * k * 2 / (t_bf16 * 1e-3) / 1e9 / copy_gbps * 100
            pct_fp8 = n * k / (t_fp8 * 1e-3) / 1e9 / copy_gbps * 100
            print(f"{name:14s} {m:4d} {t_bf16 * 1e3:9.1f} {t_mm * 1e3:10.1f} "
                  f"{t_wo * 1e3:10.1f} {pct_bf16:8.1f}% {pct_fp8:12.1f}%")
            results["rows"].append(dict(layer=name, m=m, bf16_ms=t_bf16, fp8_mm_ms=t_mm,
                                        weight_only_ms=t_wo))
            per_token[m][0] += t_bf16
            per_token[m][1] += t_mm
            per_token[m][2] += t_fp8
    print(f"\n{'M':>4s} {'bf16 ms x32':>12s} {'fp8 mm ms x32':>14s} {'fp8 used ms x32':>16s}")
    for m, (a, b, c) in per_token.items():
        print(f"{m:4d} {a * NUM_LAYERS:12.2f} {b * NUM_LAYERS:14.2f} {c * NUM_LAYERS:16.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
