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
from gridllm.bench.throughput import ThroughputConfig, format_result  # noqa: E402
from gridllm.common.logger import configure_logging  # noqa: E402


def run_alternating(config: ThroughputConfig, repeats: int) -> dict:
    """Both engines loaded once, then timed alternately ``repeats`` times each; the best
    (shortest) run of each is kept, which damps noise from other processes on a shared
    machine. Every run's time is kept in ``runs_s``. Prefix caching is off so a repeat
    recomputes its prompts as the first run did."""
    import torch

    from gridllm.bench.datasets import special_token_ids
    from gridllm.bench.hf import load_hf_model, run_hf
    from gridllm.bench.report import machine_info
    from gridllm.bench.throughput import build_llm, dataset_for, run_gridllm

    llm = build_llm(config)
    hf_config = llm.engine.runner.hf_config
    requests = dataset_for(config, hf_config.vocab_size,
                           special_token_ids(llm.tokenizer, hf_config))
    device = torch.device("cpu")
    hf_model = load_hf_model(config.model, torch.float32, device, config.seed)
    best: dict[str, dict] = {}
    times: dict[str, list[float]] = {"gridllm": [], "hf": []}
    for _ in range(repeats):
        for key, run in (("hf", lambda: run_hf(config.model, requests, config.max_num_seqs,
                                               torch.float32, device, use_tqdm=False,
                                               hf_model=hf_model)),
                         ("gridllm", lambda: run_gridllm(llm, requests, use_tqdm=False))):
            r = run()
            times[key].append(r["elapsed_s"])
            if key not in best or r["elapsed_s"] < best[key]["elapsed_s"]:
                best[key] = r
    machine = machine_info("cpu")
    machine["torch_threads"] = torch.get_num_threads()
    machine["load_average_1m_after"] = os.getloadavg()[0]
    result = {"benchmark": "throughput", "machine": machine,
              "config": {**vars(config), "repeats": repeats}, **best}
    result["config"]["input_len_range"] = list(config.input_len_range)
    result["config"]["output_len_range"] = list(config.output_len_range)
    result["runs_s"] = times
    result["speedup_vs_hf"] = best["gridllm"]["output_tokens_per_s"] / best["hf"][
        "output_tokens_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=32,
                   help="gridllm max_num_seqs and the transformers static batch size")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len-range", default="32:128")
    p.add_argument("--output-len-range", default="64:128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each engine, alternating; the best is reported")
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
        dtype="float32", seed=args.seed, compare="hf", hf_batch_size=args.batch_size,
        enable_prefix_caching=False, use_tqdm=False)
    result = run_alternating(config, args.repeats)
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
