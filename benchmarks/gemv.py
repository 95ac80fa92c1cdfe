"""Llama-3-8B's decoder linear layers at decode batch sizes: cuBLAS against the GEMV kernel.

Run on a CUDA GPU: ``python benchmarks/gemv.py [--sweep] [--fp8]``. Each figure is timed as
served: a CUDA graph of 32 launches of one layer shape over 32 distinct weights (one per
decoder block, so no weight is read from L2), replayed (``benchmarks.kernels.graph_bench``);
the time per launch is the graph's time / 32, and ``% copy`` is the weight bytes over that
time as a fraction of the copy bandwidth measured in the same run. The last rows time a
graph of the whole decoder's linear layers (q/k/v, o, gate/up, down, x 32 blocks) the same
way: its ms per token is the linear part of a batch-1 decode step. ``gemv`` is the kernel as
served (programmatic dependent launch where the card has it: each launch starts while the
previous one ends), ``gemv_plain`` the same without it. ``--sweep`` first times tile
configurations of the GEMV at M = 1 per shape; ``--fp8`` adds e4m3 weights (per-channel
scales) through the same kernel, against the e4m3 ``tl.dot`` kernel
(``kernels/fp8_gemv.py``), and the tensor-core GEMV (``kernels/fp8_mma_gemv.py``, the
``MMA`` column: up to 8 rows, where the GEMV column stops at its 4), and at one row the
GEMV with products in float16 pairs (the ``F16`` column and decoder row: ``gemv(...,
f16_pairs=True)``, what ``GRIDLLM_GEMV_F16=1`` serves). ``--fused`` (one
row) runs the layers as the model serves them: the gate/up projection with SiLU-and-mul in
its epilogue (``silu_out``; down then reads the finished activation), and the add-and-norm
before q/k/v and gate/up fused into them over 16-bit weights (``rms_norm_gemv``: each
program also takes the row's norm) but a launch of the norm kernel before them over e4m3
weights (``ops.add_rms_norm_linear`` says why); their best tiles differ from the bare
product's (the base column stays the bare product).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels._utils  # noqa: E402
from benchmarks.kernels import graph_bench  # noqa: E402
from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels.fp8_gemv import fp8_weight_matmul  # noqa: E402
from kernels.fp8_mma_gemv import MAX_ROWS as MMA_MAX_ROWS  # noqa: E402
from kernels.fp8_mma_gemv import fp8_mma_gemv  # noqa: E402
from kernels.gemv import MAX_ROWS, config_for, gemv, rms_norm_gemv  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402

# name, out features, in features (Llama-3-8B).
SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336)]
NUM_LAYERS = 32
# What the model fuses into each layer's GEMV at one row (``--fused``), by weight kind:
# "norm" the add-and-norm inside, "norm_kernel" the norm kernel's launch before it, "silu"
# SiLU-and-mul in the epilogue.
FUSION = {"bf16": {"qkv_proj": ("norm",), "gate_up_proj": ("norm", "silu")},
          "fp8": {"qkv_proj": ("norm_kernel",), "gate_up_proj": ("norm_kernel", "silu")}}
SWEEP = list(itertools.product((4, 8, 16), (512, 1024), (4,), (1,), (0,))) + [
    (8, 256, 4, 1, 0), (16, 256, 4, 1, 0), (32, 256, 4, 1, 0), (32, 512, 4, 1, 0),
    (8, 512, 8, 1, 0), (16, 1024, 8, 1, 0), (8, 512, 4, 1, 1), (16, 512, 4, 1, 1),
    (4, 2048, 4, 1, 0), (8, 2048, 8, 1, 0), (2, 1024, 4, 1, 0), (2, 2048, 4, 1, 0),
    (4, 1024, 2, 1, 0), (8, 1024, 2, 1, 0)]


def graph_time_ms(calls, replays: int = 20, launch_dependent: bool = True) -> float:
    """Median time of one replay of a CUDA graph of ``calls`` (each a no-arg callable),
    captured with programmatic dependent launch on or off."""
    kernels._utils.LAUNCH_DEPENDENT = launch_dependent
    return graph_bench(lambda: [call() for call in calls], reps=replays)


def _weights(n: int, k: int, fp8: bool):
    ws = []
    for _ in range(NUM_LAYERS):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        if fp8:
            s = (w.float().abs().amax(-1) / 448.0).clamp_min(1e-12)
            ws.append(((w.float() / s[:, None]).to(torch.float8_e4m3fn), s.contiguous()))
        else:
            ws.append((w, None))
    return ws


def _inputs(m: int, k: int):
    """``(x, residual, norm weight)`` for ``m`` rows of ``k`` inputs; only a norm reads the
    residual and the norm weight."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    return x, residual, norm_weight


def _calls(impl: str, layer_weights, inputs, config, fusion: tuple[str, ...] = ()):
    x, residual, norm_weight = inputs
    if impl == "base":  # what decode ran before the GEMV: cuBLAS, or the e4m3 tl.dot kernel
        return [lambda w=w, s=s: F.linear(x, w) if s is None else fp8_weight_matmul(x, w, s)
                for w, s in layer_weights]
    silu = "silu" in fusion
    if impl == "mma":  # e4m3 only: the tensor-core GEMV served at 2-8 rows
        return [lambda w=w, s=s: fp8_mma_gemv(x, w, s, silu_out=silu)
                for w, s in layer_weights]
    if "norm" in fusion:
        return [lambda w=w, s=s: rms_norm_gemv(x, residual, norm_weight, 1e-5, w, None, s,
                                               config=config, silu_out=silu)
                for w, s in layer_weights]
    calls = []
    f16_pairs = impl == "f16"  # e4m3, one row: products in float16 pairs
    for w, s in layer_weights:
        if "norm_kernel" in fusion:
            calls.append(lambda: rms_norm(x, norm_weight, 1e-5, residual))
        calls.append(lambda w=w, s=s: gemv(x, w, None, s, config=config, silu_out=silu,
                                           f16_pairs=f16_pairs))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,2,4",
                        help=f"values of M (the GEMV at most {MAX_ROWS}, the tensor-core "
                             f"GEMV {MMA_MAX_ROWS})")
    parser.add_argument("--sweep", action="store_true", help="time GEMV tile configurations")
    parser.add_argument("--fp8", action="store_true", help="also e4m3 weights")
    parser.add_argument("--fused", action="store_true",
                        help="the norm and SiLU-and-mul fused in, as served (one row)")
    parser.add_argument("--output", default=None, help="write results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gemv.py needs a CUDA GPU")
    limits = measure_limits(torch.device("cuda"))
    copy = limits["copy_bandwidth_gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = [int(r) for r in args.rows.split(",")]
    if args.fused and rows != [1]:
        sys.exit("--fused times one row: pass --rows 1")
    results = {"device": torch.cuda.get_device_name(), "limits": limits, "shapes": [],
               "sweep": {}}
    kinds = ["bf16"] + (["fp8"] if args.fp8 else [])
    weights = {(kind, name): _weights(n, k, kind == "fp8")
               for kind in kinds for name, n, k in SHAPES}

    def pct(n, k, elem, ms):
        return n * k * elem / (ms * 1e-3) / 1e9 / copy * 100

    if args.sweep:
        # The e4m3 weights through the word GEMV and through the float16-pair one.
        swept = [(kind, "gemv") for kind in kinds] + ([("fp8", "f16")] if args.fp8 else [])
        for kind, impl in swept:
            for name, n, k in SHAPES:
                fusion = FUSION[kind].get(name, ()) if args.fused else ()
                inputs = _inputs(1, k)
                timed = {}
                default = config_for(n, k, 1 if kind == "fp8" else 2, fused="norm" in fusion)
                for config in SWEEP + ([default] if default not in SWEEP else []):
                    try:
                        ms = graph_time_ms(_calls(impl, weights[kind, name], inputs, config,
                                                  fusion))
                    except Exception as exc:  # a configuration Triton cannot build
                        print(f"{kind} {impl} {name} {config}: {type(exc).__name__}: "
                              f"{str(exc)[:100]}")
                        continue
                    timed[config] = ms / NUM_LAYERS
                top = sorted(timed, key=timed.get)[:5]
                elem = 1 if kind == "fp8" else 2
                label = kind if impl == "gemv" else f"{kind} {impl}"
                print(f"sweep {label} {name}: " + ", ".join(
                    f"{c} {timed[c] * 1e3:.1f} us ({pct(n, k, elem, timed[c]):.0f}%)"
                    for c in top) + f"; default {default} "
                    f"{timed.get(default, float('nan')) * 1e3:.1f} us")
                results["sweep"][f"{label.replace(' ', '/')}/{name}"] = [
                    [list(c), timed[c]] for c in top]

    print(f"{'layer':14s} {'kind':5s} {'M':>3s} {'base us':>10s} {'GEMV us':>8s} "
          f"{'MMA us':>7s} {'F16 us':>7s} {'base %':>9s} {'GEMV %':>7s} {'F16 %':>6s}  "
          "(base: cuBLAS for bf16, the tl.dot kernel for fp8; MMA: the tensor-core GEMV, "
          "F16: the GEMV with products in float16 pairs, e4m3 only)")
    for kind in kinds:
        elem = 1 if kind == "fp8" else 2
        for name, n, k in SHAPES:
            fusion = FUSION[kind].get(name, ()) if args.fused else ()
            for m in rows:
                inputs = _inputs(m, k)
                t_base = graph_time_ms(_calls("base", weights[kind, name], inputs, None)) \
                    / NUM_LAYERS
                t_gemv = graph_time_ms(_calls("gemv", weights[kind, name], inputs, None,
                                              fusion)) / NUM_LAYERS if m <= MAX_ROWS \
                    else float("nan")
                t_mma = graph_time_ms(_calls("mma", weights[kind, name], inputs, None,
                                             fusion)) / NUM_LAYERS \
                    if kind == "fp8" and m <= MMA_MAX_ROWS else float("nan")
                t_f16 = graph_time_ms(_calls("f16", weights[kind, name], inputs, None,
                                             fusion)) / NUM_LAYERS \
                    if kind == "fp8" and m == 1 else float("nan")
                row = {"layer": name, "kind": kind, "rows": m, "base_ms": t_base,
                       "gemv_ms": t_gemv, "mma_ms": t_mma, "f16_ms": t_f16,
                       "base_pct_copy": pct(n, k, elem, t_base),
                       "gemv_pct_copy": pct(n, k, elem, t_gemv),
                       "f16_pct_copy": pct(n, k, elem, t_f16)}
                results["shapes"].append(row)
                print(f"{name:14s} {kind:5s} {m:3d} {t_base * 1e3:10.1f} {t_gemv * 1e3:8.1f} "
                      f"{t_mma * 1e3:7.1f} {t_f16 * 1e3:7.1f} {row['base_pct_copy']:8.0f}% "
                      f"{row['gemv_pct_copy']:6.0f}% {row['f16_pct_copy']:5.0f}%")
    # The whole decoder's linear layers, in block order, as one graph.
    results["decoder"] = []
    for kind in kinds:
        elem = 1 if kind == "fp8" else 2
        total_bytes = NUM_LAYERS * sum(n * k * elem for _, n, k in SHAPES)
        for m in rows:
            fusions = {name: FUSION[kind].get(name, ()) if args.fused else ()
                       for name, _, _ in SHAPES}
            inputs = {name: _inputs(m, k) for name, _, k in SHAPES}
            per = {}
            impls = ["base"] + (["gemv", "gemv_plain"] if m <= MAX_ROWS else []) + (
                ["mma"] if kind == "fp8" and m <= MMA_MAX_ROWS else []) + (
                ["f16"] if kind == "fp8" and m == 1 else [])
            for impl in impls:
                calls = []
                for layer in range(NUM_LAYERS):
                    for name, _, _ in SHAPES:
                        w, s = weights[kind, name][layer]
                        calls += _calls(impl.split("_")[0], [(w, s)], inputs[name], None,
                                        fusions[name])
                per[impl] = graph_time_ms(calls, launch_dependent=impl != "gemv_plain")
            row = {"kind": kind, "rows": m, "bytes": total_bytes,
                   "bound_ms": total_bytes / (copy * 1e9) * 1e3, **{
                       f"{impl}_ms": t for impl, t in per.items()}}
            results["decoder"].append(row)
            print(f"decoder linears x{NUM_LAYERS} {kind} M={m}: bound "
                  f"{row['bound_ms']:.3f} ms; " + ", ".join(
                      f"{impl} {t:.3f} ms ({row['bound_ms'] / t * 100:.0f}% of copy)"
                      for impl, t in per.items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
