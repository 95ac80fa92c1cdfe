"""The Gluon prefill kernel's two launches on batches of few requests, as a single prompt's
first step is (time to first token): a program per SM walking the items (``persistent``)
against a program per query tile and head, each replayed from a CUDA graph (GPU time only,
L2 flushed), beside torch SDPA on the same shapes.

Usage: ``python benchmarks/prefill_single.py [--shapes 1x256 1x2048 1x8192 4x4096]
[--block-size 16] [--output FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import bench, graph_bench, paged_kv, prefill_problem  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def shape(text: str) -> tuple[int, int]:
    try:
        reqs, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is REQUESTSxTOKENS, got {text!r}") from None
    if reqs < 1 or length < 64:
        raise argparse.ArgumentTypeError(f"a shape needs 1+ requests of 64+ tokens, got {text!r}")
    return reqs, length


def graph_us(gpa, q, kc, vc, tables, seq, qsl, length: int, persistent: bool) -> float:
    """Milliseconds of the Gluon kernel's launch replayed from a CUDA graph."""
    from kernels.prefill_args import query_tiles

    tiles = query_tiles(qsl, seq, q.shape[0], length, gpa.BLOCK_M, longest_first=persistent)
    out = torch.empty_like(q)
    return graph_bench(lambda: gpa.gluon_prefill_attention(
        q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5, length, out, tiles,
        persistent=persistent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", type=shape, nargs="+",
                        default=[shape(s) for s in ("1x256", "1x1024", "1x2048", "1x8192",
                                                    "4x4096")])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_single.py needs a CUDA GPU")
    from kernels import gluon_prefill_attention as gpa

    results = []
    print(f"{torch.cuda.get_device_name()}: causal bf16, {HEADS} heads ({KV_HEADS} KV), head "
          f"dim {HEAD_DIM}, cache blocks of {args.block_size}; us (TFLOP/s)")
    print(f"{'shape':>8s} {'persistent':>16s} {'per tile':>16s} {'SDPA':>16s}")
    for reqs, length in args.shapes:
        kc, vc, tables, seq = paged_kv(reqs, length, KV_HEADS, HEAD_DIM, args.block_size,
                                       torch.bfloat16)
        q, qsl, flops, sdpa = prefill_problem(reqs, length, HEADS, HEAD_DIM, torch.bfloat16)
        row = {"shape": f"{reqs}x{length}"}
        for name, persistent in (("persistent", True), ("per_tile", False)):
            row[name] = graph_us(gpa, q, kc, vc, tables, seq, qsl, length, persistent)
        row["sdpa"] = bench(sdpa)
        cells = " ".join(f"{1e3 * row[k]:8.1f} ({flops / row[k] / 1e9:4.0f})"
                         for k in ("persistent", "per_tile", "sdpa"))
        print(f"{row['shape']:>8s} {cells}")
        results.append(row)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), ms=results), f, indent=1)


if __name__ == "__main__":
    main()
