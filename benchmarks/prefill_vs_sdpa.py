"""The served prefill attention kernel against torch's SDPA, timed in alternation.

torch's SDPA on the same 4 x 4096 causal bf16 shapes has measured 534-606 TFLOP/s on one
H200 depending on when in a script it ran; timing the two in turns, several rounds, puts
both under the same clocks and power. Per round, shape and cache block size: the served
kernel (``kernels.prefill_attention.prefill_attention`` over a paged cache, whichever kernel
it dispatches to), each ``--alt`` launch of the Gluon kernel (its keyword arguments, the
query tiles built once as the served kernel's are; ``longest_first=0`` keeps them request by
request, ``alternate_ties=1`` runs every other run of equal tiles backwards) and SDPA
(cuDNN's or flash's kernel, as torch picks, on contiguous tensors), each the median of
about ``--rep-ms`` of runs with L2 flushed; then the medians of each over the rounds and
of each one's ratio to SDPA.

Usage: ``python benchmarks/prefill_vs_sdpa.py [--rounds 5] [--rep-ms 200]
[--cache-block-sizes 16 64] [--shapes 4x4096 16x1024] [--alt overlap=1 stages=2 ...]
[--output FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import bench, paged_kv, prefill_problem  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def parse_shape(text: str) -> tuple[int, int]:
    """``"4x4096"`` as (sequences, tokens each)."""
    try:
        seqs, tokens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes SEQSxTOKENS, got {text!r}") from None
    if seqs < 1 or tokens < 1:
        raise argparse.ArgumentTypeError(f"--shapes needs positive sizes, got {text!r}")
    return seqs, tokens


def parse_alt(text: str) -> dict:
    """``"overlap=1,stages=2"`` as the Gluon kernel's keyword arguments."""
    launch = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"--alt takes KEY=INT[,KEY=INT], got {text!r}")
        try:
            launch[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--alt {key} must be an integer, got "
                                             f"{value!r}") from None
    return launch


def alt_tiles(cache: dict, launch: dict, qsl: torch.Tensor, seq: torch.Tensor,
              num_tokens: int, max_query_len: int) -> tuple[torch.Tensor, dict]:
    """The query tiles an ``--alt`` launch takes (kept in ``cache`` as a step's layers keep
    them), and the rest of its arguments, the Gluon kernel's. Beside those, ``--alt``
    takes ``longest_first=0`` (the persistent launch over the tiles request by request,
    each request's tiles together) and ``alternate_ties=0|1`` (``prefill_args.ALTERNATE_TIES``:
    every other run of equally long tiles backwards)."""
    from kernels import gluon_prefill_attention as gpa
    from kernels.prefill_args import cached_query_tiles

    launch = dict(launch)
    longest = bool(launch.pop("longest_first", launch.get("persistent", gpa.PERSISTENT)))
    alternate = launch.pop("alternate_ties", None)
    tiles = cached_query_tiles(cache, qsl, seq, num_tokens, max_query_len, gpa.BLOCK_M,
                               longest_first=longest,
                               alternate_ties=None if alternate is None else bool(alternate))
    return tiles, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--cache-block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(4, 4096)],
                        help="causal prefills as SEQSxTOKENS (default 4x4096)")
    parser.add_argument("--alt", type=parse_alt, nargs="*", default=[],
                        help="Gluon kernel launches to time beside the served kernel, each "
                             "KEY=INT[,KEY=INT] of gluon_prefill_attention's arguments")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_vs_sdpa.py needs a CUDA GPU")
    from kernels import gluon_prefill_attention as gpa
    from kernels.prefill_attention import prefill_attention

    dtype = torch.bfloat16
    names = ["served"] + [",".join(f"{k}={v}" for k, v in a.items()) for a in args.alt]
    print(f"{torch.cuda.get_device_name()}: causal bf16, {HEADS} heads ({KV_HEADS} KV), head "
          f"dim {HEAD_DIM}; TFLOP/s")
    print(f"{'round':>5s} {'shape':>9s} {'blocks':>6s} "
          + " ".join(f"{n:>12s}" for n in names) + f" {'SDPA':>8s} {'ratio':>6s}")
    rounds = {}
    summary = {}
    for seqs, tokens in args.shapes:
        q, qsl, flops, sdpa = prefill_problem(seqs, tokens, HEADS, HEAD_DIM, dtype)
        caches = {b: paged_kv(seqs, tokens, KV_HEADS, HEAD_DIM, b, dtype)
                  for b in args.cache_block_sizes}
        shape = f"{seqs}x{tokens}"

        def tflops(ms: float, flops=flops) -> float:
            return flops / (ms * 1e-3) / 1e12

        cache = {}  # the served kernel's query tiles, built once as for a step's layers
        for r in range(args.rounds):
            for b, (kc, vc, tables, seq) in caches.items():
                row = {"served": tflops(bench(
                    lambda kc=kc, vc=vc, tables=tables, seq=seq, q=q, qsl=qsl, tokens=tokens,
                    cache=cache:
                    prefill_attention(q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5,
                                      max_query_len=tokens, batch_cache=cache,
                                      # as served: no one-query request
                                      split_one_token=False),
                    rep_ms=args.rep_ms))}
                for name, launch in zip(names[1:], args.alt, strict=True):
                    if not gpa.serves(q, kc, vc):
                        continue
                    tiles, launch = alt_tiles(cache, launch, qsl, seq, q.shape[0], tokens)
                    row[name] = tflops(bench(
                        lambda kc=kc, vc=vc, tables=tables, seq=seq, q=q, qsl=qsl,
                        tokens=tokens, tiles=tiles, launch=launch:
                        gpa.gluon_prefill_attention(q, kc, vc, tables, seq, qsl,
                                                    HEAD_DIM ** -0.5, max_query_len=tokens,
                                                    tiles=tiles, **launch),
                        rep_ms=args.rep_ms))
                row["sdpa"] = tflops(bench(sdpa, rep_ms=args.rep_ms))
                rounds.setdefault(f"{shape} blocks of {b}", []).append(row)
                print(f"{r:5d} {shape:>9s} {b:6d} "
                      + " ".join(f"{row.get(n, float('nan')):12.0f}" for n in names)
                      + f" {row['sdpa']:8.0f} {row['served'] / row['sdpa']:6.2f}")
        del caches
    for key, rows in rounds.items():
        s = summary[key] = {}
        for n in names + ["sdpa"]:
            if n in rows[0]:
                s[f"{n}_tflops"] = statistics.median(x[n] for x in rows)
                if n != "sdpa":
                    s[f"{n}_ratio"] = statistics.median(x[n] / x["sdpa"] for x in rows)
        print(f"median, {key}: " + ", ".join(
            f"{n} {s[n + '_tflops']:.0f}" + (f" ({s[n + '_ratio']:.2f}x)" if n != "sdpa" else "")
            for n in names + ["sdpa"] if n + "_tflops" in s))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rounds=rounds,
                           summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
