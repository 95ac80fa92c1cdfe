"""``gridllm bench collectives``: the time a tensor-parallel decode step spends communicating.

    gridllm bench collectives --model random:llama3-8b --tensor-parallel-size 2

A step of a sharded model runs one all-reduce of ``[batch, hidden]`` per row-parallel layer
and per vocab-parallel embedding (counted on the model itself: 2 per decoder layer, plus the
embedding) and one all-gather of its logits ``[batch, vocab / T]``. This times exactly those
collectives, alone, over T processes with the engine's own group code (NCCL on CUDA, rank r
on ``cuda:r``, NVLink multicast off; gloo on the CPU): one all-reduce, and a whole step's
worth eager and, on CUDA, replayed from one CUDA graph as decode runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

# Seconds the ranks may take to start, join the group and time everything.
_TIMEOUT_S = 600.0


@dataclass
class CollectivesConfig:
    """What ``bench collectives`` runs; fields mirror the CLI flags."""

    model: str
    tensor_parallel_size: int = 2
    # Rows of the activations (decode: one per running request).
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    dtype: str = "auto"
    device: str = "auto"
    num_iters: int = 50
    num_warmup: int = 5

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 2:
            raise ValueError(f"tensor_parallel_size must be at least 2, "
                             f"got {self.tensor_parallel_size}.")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}.")
        for name in ("num_iters", "num_warmup"):
            if getattr(self, name) < (1 if name == "num_iters" else 0):
                raise ValueError(f"{name} must be at least "
                                 f"{1 if name == 'num_iters' else 0}, got {getattr(self, name)}.")


@dataclass(frozen=True)
class StepShapes:
    """The collectives of one step of a sharded model."""

    hidden_size: int
    # Per rank (the vocabulary padded to a multiple of the ranks, split).
    vocab_per_rank: int
    num_all_reduces: int


def step_shapes(model: str, tensor_parallel_size: int) -> StepShapes:
    """The collectives of ``model``'s step, counted on its layers (built on the meta device)."""
    import torch

    from gridllm.bench.roofline import meta_model
    from worker_svc.parallel.layers import RowParallelLinear, VocabParallelEmbedding

    built, hf_config = meta_model(model, torch.bfloat16)
    num = sum(isinstance(m, (RowParallelLinear, VocabParallelEmbedding))
              for m in built.modules())
    if num == 0:
        raise ValueError(f"model {model!r}: {hf_config.architectures[0]} is not sharded "
                         "(no tensor-parallel layers).")
    vocab = hf_config.vocab_size
    return StepShapes(hf_config.hidden_size, -(-vocab // tensor_parallel_size), num)


def run_collectives(config: CollectivesConfig) -> dict[str, Any]:
    """Time the collectives over ``tensor_parallel_size`` processes; a JSON-ready dict."""
    import torch

    from gridllm.bench.report import machine_info
    from gridllm.common.config import ModelConfig
    from gridllm.common.grpc_utils import free_port
    from worker_svc.parallel.state import disable_nvlink_multicast
    from worker_svc.ranks.launch import rank_device

    size = config.tensor_parallel_size
    model_config = ModelConfig(config.model, device=config.device, tensor_parallel_size=size)
    devices = [rank_device(model_config, r) for r in range(size)]  # ValueError: too few GPUs
    shapes = step_shapes(config.model, size)
    disable_nvlink_multicast()  # inherited by every rank
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, name=f"gridllm-collectives-rank{r}",
                                 args=(r, devices[r], port, config, shapes, results))
                 for r in range(size)]
    for process in processes:
        process.start()
    try:
        kind, payload = results.get(timeout=_TIMEOUT_S)
    finally:
        for process in processes:
            process.join(30.0)
            if process.is_alive():
                process.kill()
                process.join()
    if kind == "error":
        raise RuntimeError(f"a rank failed:\n{payload}")
    backend = "nccl" if devices[0].startswith("cuda") else "gloo"
    device_type = "cuda" if backend == "nccl" else "cpu"
    name = torch.cuda.get_device_name(0) if backend == "nccl" else "cpu"
    return {"benchmark": "collectives", "model": config.model,
            "machine": machine_info(device_type), "device": name, "backend": backend,
            "config": dataclasses.asdict(config), "shapes": dataclasses.asdict(shapes),
            "results": payload}


def _rank_main(rank: int, device: str, port: int, config: CollectivesConfig,
               shapes: StepShapes, results) -> None:
    import traceback

    try:
        rows = _time_rank(rank, device, port, config, shapes)
        if rank == 0:
            results.put(("ok", rows))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _time_rank(rank: int, device: str, port: int, config: CollectivesConfig,
               shapes: StepShapes) -> list[dict[str, Any]]:
    from datetime import timedelta

    import torch

    from worker_svc.parallel.state import destroy_tensor_parallel, init_tensor_parallel
    from worker_svc.torch_utils import resolve_dtype

    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.set_device(torch.device(device))
    size = config.tensor_parallel_size
    store = torch.distributed.TCPStore("127.0.0.1", port, size, is_master=rank == 0,
                                       timeout=timedelta(seconds=120))
    state = init_tensor_parallel(rank, size, "nccl" if is_cuda else "gloo", store)
    dtype = resolve_dtype(config.dtype, torch.device(device))
    try:
        return [_time_batch(state, batch, dtype, device, config, shapes)
                for batch in config.batch_sizes]
    finally:
        destroy_tensor_parallel()


def _time_batch(state, batch: int, dtype, device: str, config: CollectivesConfig,
                shapes: StepShapes) -> dict[str, Any]:
    import torch

    is_cuda = device.startswith("cuda")
    # Zeros: repeated in-place sums stay finite.
    hidden = torch.zeros(batch, shapes.hidden_size, dtype=dtype, device=device)
    logits = torch.zeros(batch, shapes.vocab_per_rank, dtype=dtype, device=device)

    def one() -> None:
        state.all_reduce(hidden)

    def step() -> None:
        for _ in range(shapes.num_all_reduces):
            state.all_reduce(hidden)
        state.all_gather(logits)

    return {"batch_size": batch, "all_reduce_bytes": hidden.numel() * hidden.element_size(),
            "all_reduce_us": _median_s(one, config, is_cuda) * 1e6,
            "step_eager_ms": _median_s(step, config, is_cuda) * 1e3,
            "step_graph_ms": _graph_step_s(step, config) * 1e3 if is_cuda else None}


def _median_s(fn, config: CollectivesConfig, is_cuda: bool) -> float:
    """Median seconds of ``fn`` over the iterations, every rank starting together."""
    import torch

    for _ in range(config.num_warmup):
        fn()
    times = []
    for _ in range(config.num_iters):
        torch.distributed.barrier()
        if is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _graph_step_s(step, config: CollectivesConfig) -> float:
    """Median seconds of ``step`` captured once in a CUDA graph and replayed (decode)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # the communicators exist before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _median_s(graph.replay, config, True)


def format_result(result: dict[str, Any]) -> str:
    from gridllm.bench.report import format_table

    shapes = result["shapes"]
    rows = [[r["batch_size"], r["all_reduce_bytes"], r["all_reduce_us"], r["step_eager_ms"],
             r["step_graph_ms"] if r["step_graph_ms"] is not None else "n/a"]
            for r in result["results"]]
    return (f"model {result['model']}: {result['config']['tensor_parallel_size']} ranks "
            f"({result['backend']}, {result['device']}); a step = "
            f"{shapes['num_all_reduces']} all-reduces of [batch, {shapes['hidden_size']}] + "
            f"one all-gather of [batch, {shapes['vocab_per_rank']}]\n"
            + format_table(rows, ["batch", "all-reduce bytes", "all-reduce us",
                                  "step eager ms", "step graph ms"]))


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset, random:<preset>, HF directory")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8,64,256", help="comma-separated rows")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-iters", type=int, default=50)
    p.add_argument("--num-warmup", type=int, default=5)
    p.add_argument("--output", default=None, help="write the result as JSON here")


def cmd_collectives(args: argparse.Namespace) -> int:
    from gridllm.bench.report import write_json

    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ValueError(f"--batch-sizes: expected comma-separated integers, "
                         f"got {args.batch_sizes!r}.") from None
    config = CollectivesConfig(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                               batch_sizes=batch_sizes, dtype=args.dtype, device=args.device,
                               num_iters=args.num_iters, num_warmup=args.num_warmup)
    result = run_collectives(config)
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0
