"""Offline throughput of SmolLM2-135M at batch 32 on the CPU, next to transformers.

    python benchmarks/cpu_smollm2.py [--num-prompts 32] [--output result.json]

Both run the same random token-id prompts (seeded), greedy with every request generating
exactly its own output length: gridllm with ``max_num_seqs=32`` (continuous batching),
transformers ``generate`` in static batches of 32 (left-padded; see gridllm/bench/hf.py for
how output tokens are counted). Results go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.datasets import parse_range  # noqa: E402
from gridllm.bench.report import write_json  # noqa: E402
from gridllm.bench.throughput import ThroughputConfig, format_result, run_throughput  # noqa: E402
from gridllm.logger import configure_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=32,
                   help="gridllm max_num_seqs and the transformers static batch size")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len-range", default="64:256")
    p.add_argument("--output-len-range", default="64:128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ThroughputConfig(
        model=args.model, num_prompts=args.num_prompts,
        input_len_range=parse_range(args.input_len_range, "--input-len-range"),
        output_len_range=parse_range(args.output_len_range, "--output-len-range"),
        max_num_seqs=args.batch_size, max_num_batched_tokens=8192, device="cpu",
        dtype="float32", seed=args.seed, compare="hf", hf_batch_size=args.batch_size)
    result = run_throughput(config)
    import torch

    result["machine"]["torch_threads"] = torch.get_num_threads()
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
