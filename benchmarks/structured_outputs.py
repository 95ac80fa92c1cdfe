"""What structured outputs cost: per-step overhead at a batch of constrained requests, and
the time to first token of a request whose schema is new.

    python benchmarks/structured_outputs.py [--device cpu] [--batch-size 64] [--output r.json]
    python benchmarks/structured_outputs.py --device cuda --model random:llama3-8b \\
        --tokenizer smollm2-135m            # a large model's step, a real tokenizer's grammar
    python benchmarks/structured_outputs.py --tokenizer smollm2-135m --tiny-vocab 128256 \\
        --max-steps-in-flight 2             # the host's share on the CPU, at Llama 3's width

1. **Decode steps**: ``--batch-size`` chat requests decode ``--num-steps`` tokens each
   (greedy, ``ignore_eos``), unconstrained, every one constrained by a JSON schema (an
   unbounded array of nested objects, so the grammar stays active), and constrained again
   with the tokens accepted and the masks filled on the step loop (the reference the
   background grammar thread replaces), through the in-process engine; alternating runs,
   the best median step time of each is kept and the overhead is the median ratio of each
   constrained run to the unconstrained run just before it. The constrained runs also
   report the host time per masked step, split into the step loop's share (waiting for the
   grammar thread, filling the rows it did not, sending) and the thread's (accepting the
   step's tokens, filling the next masks), and the bitmask kernel (xgrammar's C++ loop on
   the CPU) timed alone at that batch.
2. **TTFT with a new schema** (``LLM.generate``, max_tokens=1): unconstrained, a schema never
   seen (compiled at admission), the same schema again (cached), and the compile alone.
3. **A new schema reaching a busy worker**: ``--batch-size - 1`` unconstrained requests
   decode while one with a new schema arrives at the engine directly (as over the
   scheduler's Step stream, no front compiling it first): how long its first sampling step
   waited for the compile, next to the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.report import format_table, machine_info, write_json  # noqa: E402
from gridllm.common.logger import configure_logging  # noqa: E402

PET = {"type": "object", "properties": {
    "name": {"type": "string"}, "species": {"enum": ["cat", "dog", "parrot"]},
    "age": {"type": "integer"}, "toys": {"type": "array", "items": {"type": "string"}},
    "owner": {"type": "object", "properties": {"name": {"type": "string"},
                                               "is_adult": {"type": "boolean"}},
              "required": ["name", "is_adult"]}},
    "required": ["name", "species", "age", "toys", "owner"]}
# Unbounded: the model can always continue, so every row stays constrained for the run.
STEP_SCHEMA = {"type": "array", "items": PET}


def _prompts(llm, count: int) -> list[list[int]]:
    from gridllm.common.tokenizer import apply_chat_template

    return [apply_chat_template(llm.get_tokenizer(), [{
        "role": "user", "content": f"List pets {i} as a JSON array of objects."}])
        for i in range(count)]


def decode_step_times(llm, prompts: list[list[int]], params_list: list) -> list[float]:
    """Seconds of each engine step once every request decodes (prefill steps dropped)."""
    engine = llm.engine
    req_ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for req_id, prompt, params in zip(req_ids, prompts, params_list, strict=True):
        engine.add_request(engine.make_request(req_id, prompt, params))
    has_sampled: set[str] = set()
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        updates = engine.step()
        if len(has_sampled) == len(req_ids):
            times.append(time.perf_counter() - start)
        has_sampled.update(u.req_id for u in updates if u.new_token_ids)
    return times[1:-1]  # the ends overlap a prefill step or drain the pipeline


# The timed runs: name -> (constrained, masks overlapped with the step loop).
MODES = {"unconstrained": (False, True), "constrained": (True, True),
         "constrained_on_loop": (True, False)}
# MaskTimings fields reported per masked step (ms).
HOST_PARTS = ("on_loop", "wait_accept_on_loop", "wait_fill_on_loop", "accept_on_loop",
              "fill_on_loop", "send_on_loop", "accept_off_loop", "fill_off_loop")


def step_overhead(llm, batch_size: int, num_steps: int, repeats: int) -> dict[str, Any]:
    from gridllm import SamplingParams, StructuredOutputsParams

    prompts = _prompts(llm, batch_size)
    free = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
    constrained = free.clone(structured_outputs=StructuredOutputsParams(json=STEP_SCHEMA))
    llm.engine.runner.structured_outputs.check(constrained.structured_outputs)
    manager = llm.engine.runner.structured_outputs
    runs: dict[str, list[float]] = {name: [] for name in MODES}
    host: dict[str, dict[str, list[float]]] = {name: {} for name in MODES if MODES[name][0]}
    mask_ms: dict[str, list[float]] = {name: [] for name in host}
    for _ in range(repeats):
        for name, (is_constrained, is_overlapped) in MODES.items():
            manager.set_overlapped(is_overlapped)  # fresh timings
            before = (manager.mask_seconds, manager.num_masked_steps)
            median = statistics.median(decode_step_times(
                llm, prompts, [constrained if is_constrained else free] * batch_size))
            runs[name].append(median * 1000)
            if is_constrained:
                num = max(manager.num_masked_steps - before[1], 1)
                mask_ms[name].append(1000 * (manager.mask_seconds - before[0]) / num)
                timings = manager.timings.as_dict()
                for part in HOST_PARTS:
                    host[name].setdefault(part, []).append(1000 * timings[part] / num)
    manager.set_overlapped(True)

    def overhead(name: str) -> float:
        # Each run against the unconstrained one just before it: on a shared machine the
        # load drifts between runs more than the overhead being measured.
        return 100 * (statistics.median(
            c / u for u, c in zip(runs["unconstrained"], runs[name], strict=True)) - 1)

    return {"batch_size": batch_size, "num_steps": num_steps,
            "step_ms_unconstrained": min(runs["unconstrained"]),
            "step_ms_constrained": min(runs["constrained"]),
            "step_ms_constrained_on_loop": min(runs["constrained_on_loop"]),
            "overhead_pct": overhead("constrained"),
            "overhead_pct_on_loop": overhead("constrained_on_loop"),
            "mask_fill_and_send_ms_per_step": min(mask_ms["constrained"]),
            "host_ms_per_step": {name: {part: statistics.median(values)
                                        for part, values in parts.items()}
                                 for name, parts in host.items()},
            "bitmask_apply_ms": bitmask_apply_ms(llm, batch_size), "runs_ms": runs}


def bitmask_apply_ms(llm, batch_size: int, iterations: int = 50) -> float:
    """The bitmask applied to ``[batch_size, vocab]`` fp32 logits, as the sampler does."""
    import torch

    runner = llm.engine.runner
    vocab, device = runner.vocab_size, runner.device
    logits = torch.randn(batch_size, vocab, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch_size, -(-vocab // 32)),
                            dtype=torch.int32, device=device)
    rows = torch.arange(batch_size, device=device)
    if device.type == "cuda":
        from kernels.token_bitmask import apply_token_bitmask as apply
    else:
        from kernels.token_bitmask import apply_token_bitmask_cpu as apply
    for _ in range(3):
        apply(logits, bitmask, rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        apply(logits, bitmask, rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iterations


def _new_schema(tag: str) -> dict[str, Any]:
    # A property name no earlier request used: a spec the cache has not seen.
    return {**PET, "properties": {**PET["properties"], f"field_{tag}": {"type": "string"}}}


def ttft_new_schema(llm, trials: int) -> dict[str, Any]:
    from gridllm import SamplingParams, StructuredOutputsParams

    prompt = _prompts(llm, 1)
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def timed(params) -> float:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt[0]}], params, use_tqdm=False)
        return 1000 * (time.perf_counter() - start)

    rows: dict[str, list[float]] = {"unconstrained": [], "new_schema": [], "cached_schema": [],
                                    "compile_only": []}
    compiler = llm.engine.runner.structured_outputs.compiler
    for trial in range(trials):
        tag = f"{time.monotonic_ns()}_{trial}"
        rows["unconstrained"].append(timed(one))
        spec = StructuredOutputsParams(json=_new_schema(tag))
        rows["new_schema"].append(timed(one.clone(structured_outputs=spec)))
        rows["cached_schema"].append(timed(one.clone(structured_outputs=spec)))
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=_new_schema(tag + "x"))).result()
        rows["compile_only"].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rows.items()} | {
        "trials": trials}


def new_schema_at_a_busy_worker(llm, batch_size: int, num_steps: int) -> dict[str, Any]:
    from gridllm import SamplingParams, StructuredOutputsParams

    engine, manager = llm.engine, llm.engine.runner.structured_outputs
    prompts = _prompts(llm, batch_size)
    free = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
    for i, prompt in enumerate(prompts[:-1]):
        engine.add_request(engine.make_request(f"busy-{time.monotonic_ns()}-{i}", prompt, free))
    times = []
    for _ in range(8):  # prefill and settle
        engine.step()
    waits_before = (manager.num_compile_waits, manager.compile_wait_seconds)
    spec = StructuredOutputsParams(json=_new_schema(f"busy{time.monotonic_ns()}"))
    engine.add_request(engine.make_request(  # no front compiled it: the worker does
        f"busy-new-{time.monotonic_ns()}", prompts[-1],
        free.clone(max_tokens=4, structured_outputs=spec)))
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_step_ms": statistics.median(times),
            "steps_that_waited": manager.num_compile_waits - waits_before[0],
            "compile_wait_ms": 1000 * (manager.compile_wait_seconds - waits_before[1])}


def build_tiny_model(path: str, vocab_size: int, tokenizer_dir: str) -> str:
    """A 2-layer random Llama with ``vocab_size`` tokens and the files of ``tokenizer_dir``
    (its tokenizer and chat template) in ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"--tiny-vocab must cover the tokenizer's {len(tokenizer)} tokens, "
                         f"got {vocab_size}.")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or preset (a random-weight model has none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=24, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--ttft-trials", type=int, default=5)
    p.add_argument("--max-steps-in-flight", type=int, default=None,
                   help="1 or 2 (default: the engine's: 2 on CUDA, 1 elsewhere)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tiny-vocab", type=int, default=None,
                   help="serve a 2-layer random Llama (hidden 64) with this vocabulary "
                        "instead of --model, with --tokenizer's files: on the CPU its forward "
                        "costs little, so the host's share of structured decoding shows at a "
                        "large model's mask width (128256: Llama 3's)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    import torch

    from gridllm.llm import LLM
    from worker_svc.loader import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs: dict[str, Any] = {}
    if args.tokenizer:
        kwargs["tokenizer"] = resolve_model_path(args.tokenizer)
    model = model_name = args.model
    if args.tiny_vocab:
        model_name = f"tiny Llama, vocabulary {args.tiny_vocab}"
        if not args.tokenizer:
            p.error("--tiny-vocab needs --tokenizer")
        scratch = tempfile.TemporaryDirectory(prefix="structured-tiny-")
        model = build_tiny_model(scratch.name, args.tiny_vocab, kwargs["tokenizer"])
    llm = LLM(model, device=args.device, max_model_len=1024,
              max_num_seqs=args.batch_size, max_num_batched_tokens=8192, **kwargs)
    if args.max_steps_in_flight is not None:
        llm.engine.max_steps_in_flight = args.max_steps_in_flight
    machine = machine_info(args.device)
    machine["load_average_1m_before"] = os.getloadavg()[0]
    result: dict[str, Any] = {
        "benchmark": "structured_outputs", "machine": machine, "config": vars(args),
        "max_steps_in_flight": llm.engine.max_steps_in_flight,
        "vocab_size": llm.engine.runner.vocab_size,
        "steps": step_overhead(llm, args.batch_size, args.num_steps, args.repeats),
        "ttft_ms": ttft_new_schema(llm, args.ttft_trials),
        "busy_worker": new_schema_at_a_busy_worker(llm, args.batch_size, args.num_steps),
    }
    machine["load_average_1m_after"] = os.getloadavg()[0]
    write_json(args.output, result)
    steps, ttft, busy = result["steps"], result["ttft_ms"], result["busy_worker"]
    overlapped = steps["host_ms_per_step"]["constrained"]
    on_loop = steps["host_ms_per_step"]["constrained_on_loop"]
    sys.stdout.write(format_table([
        ["decode step, unconstrained (ms)", steps["step_ms_unconstrained"]],
        ["decode step, all rows constrained (ms)", steps["step_ms_constrained"]],
        ["overhead, median of paired runs (%)", steps["overhead_pct"]],
        ["  bitmask applied per step (ms)", steps["bitmask_apply_ms"]],
        ["host per step on the step loop (ms)", overlapped["on_loop"]],
        ["  waiting for the grammar thread: accept / fill (ms)",
         f"{overlapped['wait_accept_on_loop']:.2f} / {overlapped['wait_fill_on_loop']:.2f}"],
        ["  accepting / filling what the thread had not (ms)",
         f"{overlapped['accept_on_loop']:.2f} / {overlapped['fill_on_loop']:.2f}"],
        ["  sending", overlapped["send_on_loop"]],
        ["host per step off the loop: accept / fill (ms)",
         f"{overlapped['accept_off_loop']:.2f} / {overlapped['fill_off_loop']:.2f}"],
        ["masks on the loop: decode step (ms)", steps["step_ms_constrained_on_loop"]],
        ["masks on the loop: overhead (%)", steps["overhead_pct_on_loop"]],
        ["masks on the loop: host per step (ms)", on_loop["on_loop"]],
        ["  accept / fill / send (ms)", f"{on_loop['accept_on_loop']:.2f} / "
         f"{on_loop['fill_on_loop']:.2f} / {on_loop['send_on_loop']:.2f}"],
        ["TTFT unconstrained (ms)", ttft["unconstrained"]],
        ["TTFT new schema (ms)", ttft["new_schema"]],
        ["TTFT cached schema (ms)", ttft["cached_schema"]],
        ["compile of a new schema (ms)", ttft["compile_only"]],
        ["busy worker: median step (ms)", busy["median_step_ms"]],
        ["busy worker: wait for a new schema's compile (ms)", busy["compile_wait_ms"]],
    ], [f"{model_name} on {machine['device']}, batch {args.batch_size}", "value"]) + "\n")
    sys.stdout.write(json.dumps({"vocab_size": result["vocab_size"],
                                 "max_steps_in_flight": result["max_steps_in_flight"]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
