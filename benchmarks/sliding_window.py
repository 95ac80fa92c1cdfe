"""Sliding-window attention: the work and the memory a window saves at long contexts.

1. **Decode attention** (CUDA): the paged decode kernel at ``--batch-size`` requests of
   ``--context`` tokens each, dense and with a ``--window``-token sliding window, on the
   same KV cache (bf16, Llama-3-8B's 32 query / 8 KV heads of 128), and with the strided
   pattern (``--stride``). The windowed kernel starts each request at its window, so it
   should read only the window's KV; the strided one gathers ``stride + context / stride``
   keys.
2. **KV blocks per request** (any machine, no model): one request decoded to ``--context``
   tokens through the scheduler's block manager, with the window on every layer and
   without; the most blocks it held at once.
3. **Hybrid KV layout** (any machine, no model): the same request on a Gemma-2-style model
   (local layers of window ``--window`` interleaved 1:1 with global ones) with one KV
   group (dense: every layer keeps every block) and with a group per pattern (the local
   group gives back the blocks before its window). A hybrid block id holds half the
   layers, so its KV is counted in blocks of all layers; the ratio is how many more such
   requests fit in the same memory.

    python benchmarks/sliding_window.py [--output sliding_window.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.report import format_table, write_json  # noqa: E402


def blocks_held(context: int, window: int | None, block_size: int) -> int:
    """The most KV blocks one request holds while it decodes to ``context`` tokens."""
    from gridllm.common.sampling_params import SamplingParams
    from scheduler_svc.block_manager import BlockManager
    from scheduler_svc.request import Request

    manager = BlockManager(context // block_size + 2, block_size, kv_window=window)
    request = Request("r", [1] * 100, SamplingParams(max_tokens=context))
    assert manager.allocate_slots(request, request.num_tokens) is not None
    request.num_computed_tokens = request.num_tokens
    most = manager.num_held_blocks("r")
    while request.num_tokens < context:
        request.output_token_ids.append(1)
        assert manager.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        most = max(most, manager.num_held_blocks("r"))
    return most


def hybrid_blocks_held(context: int, window: int, block_size: int) -> list[int]:
    """The most KV blocks one request holds per group (global, local) while it decodes
    to ``context`` tokens, with one block table per group."""
    from gridllm.common.sampling_params import SamplingParams
    from scheduler_svc.block_manager import BlockManager
    from scheduler_svc.request import Request

    manager = BlockManager(2 * (context // block_size + 2), block_size,
                           group_windows=(None, window))
    request = Request("r", [1] * 100, SamplingParams(max_tokens=context))
    assert manager.allocate_group_slots(request, request.num_tokens) is not None
    request.num_computed_tokens = request.num_tokens
    most = [manager.num_held_blocks("r", g) for g in range(2)]
    while request.num_tokens < context:
        request.output_token_ids.append(1)
        assert manager.allocate_group_slots(request, 1) is not None
        request.num_computed_tokens += 1
        most = [max(m, manager.num_held_blocks("r", g)) for g, m in enumerate(most)]
    return most


def decode_ms(batch: int, context: int, window: int, strided: int) -> dict[str, float]:
    import torch

    from benchmarks.kernels import bench, paged_kv
    from gridllm.bench.roofline import measure_limits
    from kernels.paged_decode_attention import paged_decode_attention

    limits = measure_limits(torch.device("cuda"))
    kc, vc, tables, seq = paged_kv(batch, context, 8, 128, 16, torch.bfloat16)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, w, stride in (("dense", None, None), ("window", window, None),
                            ("strided", None, strided)):
        ms = bench(lambda w=w, stride=stride: paged_decode_attention(
            q, kc, vc, tables, seq, None, 128 ** -0.5, sliding_window=w,
            attention_stride=stride))
        read = stride + context // stride if stride else min(context, w or context)
        gbps = 2 * batch * read * 8 * 128 * 2 / (ms * 1e-3) / 1e9
        results[f"{name}_ms"] = ms
        results[f"{name}_pct_of_copy"] = 100 * gbps / limits["copy_bandwidth_gbps"]
    results["speedup"] = results["dense_ms"] / results["window_ms"]
    results["strided_speedup"] = results["dense_ms"] / results["strided_ms"]
    results["copy_bandwidth_gbps"] = limits["copy_bandwidth_gbps"]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--stride", type=int, default=128, help="of the strided pattern")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    rows, results = [], {}
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        results["decode"] = decode_ms(args.batch_size, args.context, args.window,
                                      args.stride)
        d = results["decode"]
        rows += [[f"decode attention b{args.batch_size} ctx{args.context}, dense (ms)",
                  d["dense_ms"]],
                 [f"  window {args.window} (ms)", d["window_ms"]],
                 ["  speedup (x)", d["speedup"]],
                 ["  window run, window KV read at (% of copy)", d["window_pct_of_copy"]],
                 [f"  strided {args.stride} (ms)", d["strided_ms"]],
                 ["  speedup (x)", d["strided_speedup"]],
                 ["  strided run, visited KV read at (% of copy)", d["strided_pct_of_copy"]]]
    dense = blocks_held(args.context, None, args.block_size)
    windowed = blocks_held(args.context, args.window, args.block_size)
    results["blocks_per_request"] = {"dense": dense, "window": windowed}
    rows += [[f"KV blocks held by one request at {args.context} tokens, dense", dense],
             [f"  window {args.window} on every layer", windowed]]
    global_held, local_held = hybrid_blocks_held(args.context, args.window, args.block_size)
    # A hybrid block id holds half the layers: in blocks of all layers.
    hybrid = (global_held + local_held) / 2
    results["hybrid"] = {"dense_blocks": dense, "global_group_blocks": global_held,
                         "local_group_blocks": local_held, "hybrid_blocks": hybrid,
                         "requests_at_equal_memory": dense / hybrid}
    rows += [[f"Gemma-2-style 1:1 local (window {args.window}) / global layers, KV per "
              f"request at {args.context} tokens (blocks of all layers): one group", dense],
             [f"  hybrid: global group {global_held} + local group {local_held} block ids, "
              "each half the layers", hybrid],
             ["  requests that fit in the same memory (x)", dense / hybrid]]
    sys.stdout.write(format_table(rows, ["figure", "value"]) + "\n")
    write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
