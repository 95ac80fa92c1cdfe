"""How long one engine step takes while a long prompt is prefilled beside running streams, per
per-step token budget (``max_num_batched_tokens``): the longest a running stream waits for its
next token while someone else's prompt is prefilled.

    python benchmarks/step_budget.py [--model smollm2-135m] [--budgets 256 512 1024 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# The repository's packages, not benchmarks/kernels.py, under the names they import.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gridllm.common.sampling_params import SamplingParams  # noqa: E402

NUM_RUNNING = 8


def measure(model: str, budget: int, prompt_len: int, device: str) -> dict[str, float]:
    from gridllm.llm import LLM

    llm = LLM(model, device=device, max_num_batched_tokens=budget,
              enable_prefix_caching=False, max_model_len=prompt_len + 64)
    engine = llm.engine
    running = SamplingParams(temperature=0.0, max_tokens=prompt_len, ignore_eos=True)
    for i in range(NUM_RUNNING):
        engine.add_request(engine.make_request(f"run{i}", [100 + i, 200, 300], running))
    for _ in range(3):  # every running stream past its prompt: decode steps only
        engine.step()
    decode_s = []
    for _ in range(5):
        start = time.perf_counter()
        engine.step()
        decode_s.append(time.perf_counter() - start)
    long_prompt = [(7 * k) % 1000 + 10 for k in range(prompt_len)]
    engine.add_request(engine.make_request("long", long_prompt,
                                           SamplingParams(temperature=0.0, max_tokens=1)))
    mixed_s = []
    while "long" in engine.scheduler.requests:
        start = time.perf_counter()
        engine.step()
        mixed_s.append(time.perf_counter() - start)
    return {"decode_ms": 1e3 * statistics.median(decode_s),
            "mixed_ms": 1e3 * statistics.median(mixed_s), "max_mixed_ms": 1e3 * max(mixed_s),
            "num_steps": len(mixed_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = parser.parse_args()
    print(f"| max_num_batched_tokens | decode step ms ({NUM_RUNNING} streams) | step with a "
          f"prompt chunk ms (median / max) | steps for a {args.prompt_len}-token prompt |")
    print("|---|---|---|---|")
    for budget in args.budgets:
        r = measure(args.model, budget, args.prompt_len, args.device)
        print(f"| {budget} | {r['decode_ms']:.0f} | {r['mixed_ms']:.0f} / {r['max_mixed_ms']:.0f} "
              f"| {r['num_steps']} |", flush=True)


if __name__ == "__main__":
    main()
