"""Length-aware admission on a KV-constrained workload: ``block_reservation`` none vs predicted.

    python benchmarks/block_reservation.py [--model random:tiny] [--num-prompts 96]
        [--kv-fraction 0.3] [--rounds 2] [--repeats 5] [--output result.json]

The workload: prompts from a few templates (a shared prefix per template, then a random
suffix); each template has its own output-length range (short answers to long essays), and
every request asks for the same ``max_tokens``, so only the template tells how long a
request will run. Each request stops at its drawn length through a stop token forced by a
logits processor (a random model has no natural stopping point). The KV pool holds
``--kv-fraction`` of the workload's working set (every request's prompt + output, in blocks),
so not everything fits at once.

Each mode gets a fresh engine and runs ``--rounds`` rounds of the workload (fresh suffixes
and lengths each round, same templates): round 1 starts with the predictor cold (the
200-token fallback), later rounds run on what it learnt. The modes alternate ``--repeats``
times; wall times are medians (everything else is deterministic). Reported per round: wall
time, output tokens/s, preemptions, tokens computed (prompt + output + recomputation after
preemption, less prefix-cache hits), steps and mean running batch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gridllm.bench.report import format_table, machine_info, write_json  # noqa: E402
from gridllm.common.logger import configure_logging  # noqa: E402

STOP_PROCESSOR = "bench_stop_at"
# (name, output length range): short answers to long generations, one range per template.
TEMPLATES = [("short", (8, 24)), ("medium", (48, 96)), ("long", (160, 256)),
             ("mixed", (8, 256))]
TEMPLATE_LEN = 32
SUFFIX_RANGE = (16, 64)


def register_stop_processor(stop_token_id: int) -> None:
    """Forces ``stop_token_id`` as the ``extra_args["stop_at"]``-th output token and bans it
    before."""
    from worker_svc.logits_processors import register_logits_processor, registered_logits_processors

    if STOP_PROCESSOR in registered_logits_processors():
        return

    @register_logits_processor(STOP_PROCESSOR)
    def stop_at(logits: torch.Tensor, batch) -> torch.Tensor:
        logits = logits.clone()
        for row, (stop_at, output_ids) in enumerate(zip(batch.extra_arg("stop_at"),
                                                        batch.output_token_ids, strict=True)):
            if len(output_ids) + 1 >= stop_at:
                logits[row] = float("-inf")
                logits[row, stop_token_id] = 0.0
            else:
                logits[row, stop_token_id] = float("-inf")
        return logits


def make_workload(num_prompts: int, vocab_size: int, stop_token_id: int, seed: int,
                  round_index: int) -> list[tuple[list[int], int]]:
    """``(prompt token ids, output length)`` per request; the templates depend on ``seed``
    only, the suffixes and lengths on the round too."""
    template_rng = random.Random(seed)
    ids = [t for t in range(3, vocab_size) if t != stop_token_id]
    prefixes = [[template_rng.choice(ids) for _ in range(TEMPLATE_LEN)] for _ in TEMPLATES]
    rng = random.Random(seed * 1000 + round_index + 1)
    workload = []
    for _ in range(num_prompts):
        k = rng.randrange(len(TEMPLATES))
        suffix = [rng.choice(ids) for _ in range(rng.randint(*SUFFIX_RANGE))]
        workload.append((prefixes[k] + suffix, rng.randint(*TEMPLATES[k][1])))
    return workload


def working_set_blocks(workload, block_size: int) -> int:
    return sum(-(-(len(prompt) + n) // block_size) for prompt, n in workload)


def count_steps(llm) -> dict[str, int]:
    """Counts the scheduler's steps, scheduled tokens and running requests per step."""
    scheduler = llm.engine.scheduler
    counters = {"steps": 0, "tokens": 0, "batch": 0}
    schedule = scheduler.schedule

    def counting_schedule():
        out = schedule()
        counters["steps"] += 1
        counters["tokens"] += out.total_num_scheduled_tokens
        counters["batch"] += len(out.num_scheduled_tokens)
        return out

    scheduler.schedule = counting_schedule
    return counters


def run_mode(args, mode: str, num_kv_blocks: int, stop_token_id: int) -> list[dict]:
    from gridllm import LLM, SamplingParams

    llm = LLM(args.model, block_size=args.block_size, num_kv_blocks=num_kv_blocks,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=1024,
              block_reservation=mode, prefetch_ratio=args.prefetch_ratio, seed=args.seed)
    counters = count_steps(llm)
    vocab_size = llm.engine.vocab_size
    rows = []
    for round_index in range(args.rounds):
        workload = make_workload(args.num_prompts, vocab_size, stop_token_id, args.seed,
                                 round_index)
        params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                 stop_token_ids=[stop_token_id],
                                 logits_processors=[STOP_PROCESSOR],
                                 extra_args={"stop_at": n}) for _, n in workload]
        before = dict(counters, preemptions=llm.engine.stats().num_preemptions)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p, _ in workload], params,
                               use_tqdm=False)
        elapsed = time.perf_counter() - start
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        if lengths != [n for _, n in workload]:
            raise RuntimeError(f"{mode}: requests did not stop at their drawn lengths.")
        steps = counters["steps"] - before["steps"]
        rows.append({
            "mode": mode, "round": round_index + 1, "elapsed_s": elapsed,
            "output_tokens": sum(lengths), "output_tokens_per_s": sum(lengths) / elapsed,
            "preemptions": llm.engine.stats().num_preemptions - before["preemptions"],
            "computed_tokens": counters["tokens"] - before["tokens"],
            "useful_tokens": sum(len(p) + n for p, n in workload),
            "steps": steps, "mean_batch": (counters["batch"] - before["batch"]) / max(steps, 1),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--kv-fraction", type=float, default=0.3,
                   help="KV pool size as a fraction of the working set")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=512,
                   help="every request's limit (the lengths come from the stop token)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of every mode")
    p.add_argument("--prefetch-ratio", type=float, default=0.1)
    p.add_argument("--modes", default="none,predicted")
    p.add_argument("--stop-token-id", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a tiny model gains nothing from more, and on a "
                        "busy machine extra threads spin against other processes)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    register_stop_processor(args.stop_token_id)

    from gridllm.common.random_presets import is_random_model, random_model_config

    vocab_size = (random_model_config(args.model).vocab_size if is_random_model(args.model)
                  else None)
    if vocab_size is None:
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(args.model).vocab_size
    workloads = [make_workload(args.num_prompts, vocab_size, args.stop_token_id, args.seed, r)
                 for r in range(args.rounds)]
    working_set = max(working_set_blocks(w, args.block_size) for w in workloads)
    largest = max(-(-(len(p) + n) // args.block_size) for w in workloads for p, n in w)
    num_kv_blocks = max(int(working_set * args.kv_fraction), largest)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for mode in args.modes.split(","):
            for row in run_mode(args, mode, num_kv_blocks, args.stop_token_id):
                runs.setdefault((row["mode"], row["round"]), []).append(row)
    rows = []
    for same in runs.values():
        times = sorted(r["elapsed_s"] for r in same)
        row = {**same[0], "elapsed_s": statistics.median(times), "runs_s": times}
        row["output_tokens_per_s"] = row["output_tokens"] / row["elapsed_s"]
        rows.append(row)
    headers = ["mode", "round", "wall s", "out tok/s", "preemptions", "computed tok",
               "useful tok", "steps", "mean batch"]
    print(f"{args.model}: {args.num_prompts} prompts, KV pool {num_kv_blocks} blocks of "
          f"{args.block_size} = {num_kv_blocks / working_set:.0%} of the working set "
          f"({working_set} blocks); load average {os.getloadavg()[0]:.1f}")
    print(format_table([[r["mode"], r["round"], r["elapsed_s"], r["output_tokens_per_s"],
                         r["preemptions"], r["computed_tokens"], r["useful_tokens"], r["steps"],
                         r["mean_batch"]] for r in rows], headers))
    if args.output:
        machine = machine_info("cpu")
        machine["torch_threads"] = torch.get_num_threads()
        machine["load_average_1m_after"] = os.getloadavg()[0]
        write_json(args.output, {"benchmark": "block_reservation", "machine": machine,
                                 "config": vars(args), "num_kv_blocks": num_kv_blocks,
                                 "working_set_blocks": working_set, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
