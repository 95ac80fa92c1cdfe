"""Time the fused sampling kernels on the batches a decode step hands them.

Run on a CUDA machine: ``python benchmarks/sampling.py --output sampling.json``. Each case
samples one token per row of ``[batch, vocab]`` logits with ``kernels.sampling.sample``,
replayed from a CUDA graph with the L2 flushed before each replay (``graph_bench`` of
``benchmarks/kernels.py``), beside torch's sort-based reference. ``--compare NAME=FILE``
times another copy of the module too (e.g. ``git show REV:kernels/sampling.py > FILE``),
in turns with this one, so two versions meet on the same card in the same process.

Each module is told which searches the batch needs (``no_top_k`` / ``no_top_p``, as the
sampler tells it) where its ``sample`` takes them.

``--compile`` times instead how long each copy takes to build its kernels from an empty
Triton cache: a child process a copy, with a cache directory of its own, draws the
batches a worker's warm-up draws (a 151,936-token vocabulary, bf16 logits read in place
and float32 ones, each also through a workspace (a logit bias), at 2 rows and at a row
past the whole-chunk limit, top-k, top-p and min-p on so every pass launches), then
draws them again warm; it reports both times and the kernels the cache holds after.

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
import subprocess
import sys
import tempfile
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


def _warm_up_draws(module) -> None:
    """The batches a worker's warm-up draws (see ``--compile``), synchronized."""
    vocab = 151936
    for rows in sorted({2, module.max_whole_rows(vocab, torch.device("cuda")) + 1}):
        for dtype in (torch.bfloat16, torch.float32):
            for biased in (False, True):
                logits = torch.randn(rows, vocab, device="cuda").to(dtype)
                bias = torch.zeros(rows, vocab, device="cuda") if biased else None
                module.sample(logits, torch.full((rows,), 0.8, device="cuda"),
                              torch.full((rows,), 50, dtype=torch.int32, device="cuda"),
                              torch.full((rows,), 0.9, device="cuda"),
                              torch.full((rows,), 0.05, device="cuda"),
                              torch.arange(rows, device="cuda"),
                              torch.zeros(rows, dtype=torch.int64, device="cuda"),
                              logit_bias=bias)
    torch.cuda.synchronize()


def _compile_child(path: str) -> None:
    """Runs in a child with its own ``TRITON_CACHE_DIR``: prints the cold and warm times."""
    module = sampling if path == "now" else _load("sampling_copy", path)
    torch.zeros(1, device="cuda")  # the CUDA context outside the timing
    times = []
    for _ in range(2):
        started = time.perf_counter()
        _warm_up_draws(module)
        times.append(time.perf_counter() - started)
    cache = os.environ["TRITON_CACHE_DIR"]
    kernels = sum(name.endswith(".cubin") for _, _, names in os.walk(cache) for name in names)
    print(json.dumps(dict(cold_s=times[0], warm_s=times[1], kernels=kernels)))


def compile_times(paths: dict[str, str]) -> list[dict]:
    """``_compile_child`` of each copy (``"now"`` this checkout's), one after another."""
    rows = []
    for name, path in paths.items():
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            done = subprocess.run([sys.executable, os.path.abspath(__file__),
                                   "--compile-child", path], env=env, check=True,
                                  capture_output=True, text=True, timeout=600)
        rows.append(dict(copy=name, **json.loads(done.stdout.strip().splitlines()[-1])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                        help="another copy of kernels/sampling.py to time in turns")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--compile", action="store_true",
                        help="time each copy's kernel builds from an empty Triton cache")
    parser.add_argument("--compile-child", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.turns < 1:
        parser.error("--turns must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sampling.py needs a CUDA GPU")
    if args.compile_child:
        _compile_child(args.compile_child)
        return
    paths = {"now": "now"}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or name == "now":
            parser.error(f"--compare takes NAME=FILE with a NAME other than 'now', got {spec!r}")
        paths[name] = path
    started = time.time()
    if args.compile:
        print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(f"{'copy':10s} {'cold s':>8s} {'warm s':>8s} {'kernels':>8s}")
        rows = compile_times(paths)
        for row in rows:
            print(f"{row['copy']:10s} {row['cold_s']:8.1f} {row['warm_s']:8.2f} "
                  f"{row['kernels']:8d}")
        if args.output:
            with open(args.output, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(),
                               date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                               modules=paths, compile=rows, wall_s=time.time() - started),
                          f, indent=2)
        return
    modules = {n: sampling if p == "now" else _load(f"sampling_{n}", p)
               for n, p in paths.items()}
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
