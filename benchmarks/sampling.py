"""Time the fused sampling kernels on the batches a decode step hands them.

Run on a CUDA machine: ``python benchmarks/sampling.py --output sampling.json``. Each case
samples one token per row of ``[batch, vocab]`` logits with ``kernels.sampling.sample``,
replayed from a CUDA graph with the L2 flushed before each replay (``graph_bench`` of
``benchmarks/kernels.py``), beside torch's sort-based reference. ``--compare NAME=FILE``
times another copy of the module too (e.g. ``git show REV:kernels/sampling.py > FILE``),
in turns with this one, so two versions meet on the same card in the same process.

Each module is told which searches the batch needs (``no_top_k`` / ``no_top_p``, as the
sampler tells it) where its ``sample`` takes them.

Flat logits (``N(0, 1)``, as a random-weight model writes them) keep nearly the whole
vocabulary inside top-p 0.95, so every radix pass streams every row; peaked ones
(``N(0, 4)``) leave most of it below the threshold after the first passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

from benchmarks.kernels import graph_bench  # noqa: E402
from kernels import sampling, torch_ref  # noqa: E402


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# name, batch, vocab, logits dtype, logits scale, temperature, top-k, top-p
CASES = [
    ("top-p 0.95, flat", 64, 151936, torch.bfloat16, 1.0, 0.8, 0, 0.95),
    ("top-p 0.95, peaked", 64, 151936, torch.bfloat16, 4.0, 0.8, 0, 0.95),
    ("temperature only, flat", 64, 151936, torch.bfloat16, 1.0, 0.8, 0, 1.0),
    ("top-k 50 / top-p 0.9 (kernel table's)", 256, 128256, torch.float32, 4.0, 0.8, 50, 0.9),
    ("top-k 50 / top-p 0.9, bf16", 256, 128256, torch.bfloat16, 4.0, 0.8, 50, 0.9),
    ("top-p 0.95, flat, batch 8", 8, 128256, torch.bfloat16, 1.0, 1.0, 0, 0.95),
]


def run_case(bench, modules: dict, turns: int, case) -> dict:
    name, batch, vocab, dtype, scale, temperature, top_k, top_p = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (scale * torch.randn(batch, vocab, device="cuda", generator=gen)).to(dtype)
    temp = torch.full((batch,), temperature, device="cuda")
    k = torch.full((batch,), top_k, dtype=torch.int32, device="cuda")
    p = torch.full((batch,), top_p, device="cuda")
    min_p = torch.zeros(batch, device="cuda")
    seeds = torch.arange(batch, device="cuda")
    offsets = torch.zeros(batch, dtype=torch.int64, device="cuda")
    row = dict(case=name, batch=batch, vocab=vocab, dtype=str(dtype).removeprefix("torch."))
    times: dict[str, list[float]] = {n: [] for n in modules}
    hints = dict(no_top_k=top_k <= 0, no_top_p=top_p >= 1.0)
    kwargs = {n: hints if "no_top_k" in inspect.signature(m.sample).parameters else {}
              for n, m in modules.items()}
    for _ in range(turns):
        for n, module in modules.items():
            times[n].append(bench(lambda m=module, kw=kwargs[n]: m.sample(
                logits, temp, k, p, min_p, seeds, offsets, **kw)))
    for n, ms in times.items():
        row[f"{n}_ms"] = min(ms)
        row[f"{n}_ms_turns"] = ms

    def reference():
        filtered = torch_ref.filter_logits(logits.float() / temp[:, None], k, p, min_p)
        return torch.multinomial(torch.softmax(filtered, -1), 1)

    row["torch_ms"] = bench(reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                        help="another copy of kernels/sampling.py to time in turns")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.turns < 1:
        parser.error("--turns must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sampling.py needs a CUDA GPU")
    modules = {"now": sampling}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or name == "now":
            parser.error(f"--compare takes NAME=FILE with a NAME other than 'now', got {spec!r}")
        modules[name] = _load(f"sampling_{name}", path)
    started = time.time()
    rows = []
    header = f"{'case':40s} {'batch':>5s} {'vocab':>7s} " + " ".join(
        f"{n + ' ms':>10s}" for n in modules) + f" {'torch ms':>9s}"
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(header)
    for case in CASES:
        row = run_case(graph_bench, modules, args.turns, case)
        rows.append(row)
        print(f"{row['case']:40s} {row['batch']:5d} {row['vocab']:7d} " + " ".join(
            f"{row[n + '_ms']:10.4f}" for n in modules) + f" {row['torch_ms']:9.3f}")
    result = dict(device=torch.cuda.get_device_name(),
                  date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  modules={n: getattr(m, "__file__", n) for n, m in modules.items()},
                  rows=rows, wall_s=time.time() - started)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
