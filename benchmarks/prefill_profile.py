"""A few launches of the served prefill attention kernel, then of torch's SDPA, on one causal
bf16 shape, for a profiler to pick from (Nsight Compute's ``--kernel-name`` and
``--launch-skip``): nothing is timed here.

The first launch of each builds what it needs (the Triton compile, the query tiles kept as
a step's layers keep them); the profiler skips it. ``benchmarks/gpu_open_figures.sh``'s
``prefill_ncu`` step runs this under ``ncu`` for the served kernel and for SDPA.

``--alt KEY=INT[,KEY=INT]`` launches the Gluon kernel with those of its arguments instead
of the served path (``prefill_vs_sdpa.py``'s ``--alt``, one launch).

Usage: ``python benchmarks/prefill_profile.py [--shape 64x256] [--cache-block-size 16]
[--launches 3] [--only served|sdpa] [--alt whole_sectors=1]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import paged_kv, prefill_problem  # noqa: E402
from benchmarks.prefill_vs_sdpa import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    alt_tiles,
    parse_alt,
    parse_shape,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=parse_shape, default=(64, 256),
                        help="SEQSxTOKENS (default 64x256)")
    parser.add_argument("--cache-block-size", type=int, default=16)
    parser.add_argument("--launches", type=int, default=3,
                        help="launches of each kernel (the first builds what it needs)")
    parser.add_argument("--only", choices=("served", "sdpa"), default=None)
    parser.add_argument("--alt", type=parse_alt, default=None,
                        help="the Gluon kernel's arguments as KEY=INT[,KEY=INT] instead of "
                             "the served path")
    args = parser.parse_args()
    if args.launches < 1:
        parser.error("--launches must be at least 1")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_profile.py needs a CUDA GPU")
    from kernels import gluon_prefill_attention as gpa
    from kernels.prefill_attention import prefill_attention

    seqs, tokens = args.shape
    dtype = torch.bfloat16
    q, qsl, flops, sdpa = prefill_problem(seqs, tokens, HEADS, HEAD_DIM, dtype)
    kc, vc, tables, seq = paged_kv(seqs, tokens, KV_HEADS, HEAD_DIM, args.cache_block_size,
                                   dtype)
    cache = {}
    if args.only in (None, "served"):
        if args.alt is not None:
            tiles, launch = alt_tiles(cache, args.alt, qsl, seq, q.shape[0], tokens)
        for _ in range(args.launches):
            if args.alt is None:
                prefill_attention(q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5,
                                  max_query_len=tokens, batch_cache=cache,
                                  split_one_token=False)
            else:
                gpa.gluon_prefill_attention(q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5,
                                            max_query_len=tokens, tiles=tiles, **launch)
        torch.cuda.synchronize()
    if args.only in (None, "sdpa"):
        for _ in range(args.launches):
            sdpa()
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: {seqs} x {tokens} causal bf16, {flops / 1e9:.1f} "
          f"GFLOP a launch, {args.launches} launches of {args.only or 'served and sdpa'}"
          + (f" (the Gluon kernel with {args.alt})" if args.alt else ""))


if __name__ == "__main__":
    main()
