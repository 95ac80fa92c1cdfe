"""``gridllm bench serve``: online benchmark through the router's public gRPC API, or its
OpenAI-compatible HTTP API (``--backend openai``: streamed ``/v1/completions``).

Requests (random token-id prompts, greedy, ``ignore_eos``, ``max_tokens = output_len``) are
sent as a Poisson process of ``--request-rate`` per second (``inf``: all at once), optionally
capped at ``--max-concurrency`` in flight. Each streamed response is timestamped on arrival;
``gridllm.bench.metrics`` turns the timestamps into TTFT/TPOT/ITL/E2E statistics, the same
for both backends (the HTTP requests ask for vLLM's ``return_token_ids`` so every event's
tokens are counted as the gRPC responses' are).
``--sweep r1,r2,...`` repeats the run per rate and plots latency against throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np

from gridllm.bench.datasets import BenchRequest, parse_range, random_requests
from gridllm.bench.metrics import RequestRecord, compute_serve_metrics
from gridllm.bench.report import format_table, machine_info, write_json

logger = logging.getLogger(__name__)


BACKENDS = ("grpc", "openai")


@dataclass
class ServeConfig:
    """What ``bench serve`` sends; fields mirror the CLI flags."""

    # HOST:PORT (grpc) or http://HOST:PORT (openai).
    target: str
    num_prompts: int = 256
    input_len_range: tuple[int, int] = (100, 1024)
    output_len_range: tuple[int, int] = (100, 1024)
    # Requests per second of the Poisson arrivals; math.inf sends all at once.
    request_rate: float = math.inf
    # Most requests in flight (None: no cap).
    max_concurrency: int | None = None
    seed: int = 0
    # Deadline of each request in seconds (None: none).
    request_timeout_s: float | None = None
    use_tqdm: bool = True
    # "grpc": the Generation service; "openai": the HTTP API's streamed /v1/completions.
    backend: str = "grpc"
    # The router's API key (None: $GRIDLLM_API_KEY, or none); never written to results.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got "
                             f"{self.backend!r}.")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}.")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}.")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}.")


def arrival_delays(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Seconds to wait after each send: exponential gaps of mean ``1/request_rate``
    (a Poisson process), all zero for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0 / request_rate, size=num_requests).tolist()


async def _send_one(client, request: BenchRequest, record: RequestRecord,
                    timeout_s: float | None) -> None:
    import grpc

    from gridllm.common.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
    record.send_time = time.perf_counter()
    try:
        async for chunk in client.generate_stream(
                sampling_params=params, prompt_token_ids=request.prompt_token_ids,
                return_token_ids=True, timeout=timeout_s):
            now = time.perf_counter()
            if chunk.token_ids:
                record.chunk_times.append(now)
                record.chunk_num_tokens.append(len(chunk.token_ids))
        record.end_time = time.perf_counter()
    except grpc.RpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - one failed request must not stop the run
        record.error = repr(exc)


async def _send_one_openai(client, model: str, request: BenchRequest, record: RequestRecord,
                           timeout_s: float | None) -> None:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}

    async def stream() -> None:
        async for data in client.stream_events("/v1/completions", body):
            now = time.perf_counter()
            if data == b"[DONE]":
                continue  # the stream ends next; read to its end to reuse the connection
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"].get("message"))
            num_tokens = len(event["choices"][0].get("token_ids") or ())
            if num_tokens:
                record.chunk_times.append(now)
                record.chunk_num_tokens.append(num_tokens)

    record.send_time = time.perf_counter()
    try:
        await asyncio.wait_for(stream(), timeout_s)
        record.end_time = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - one failed request must not stop the run
        record.error = repr(exc)


async def send_request(client, backend: str, model: str, request: BenchRequest,
                       record: RequestRecord, timeout_s: float | None = None) -> None:
    """One streamed request through ``backend``'s client (a gRPC ``AsyncClient`` or the
    HTTP client); its times and any error go into ``record``."""
    if backend == "openai":
        await _send_one_openai(client, model, request, record, timeout_s)
    else:
        await _send_one(client, request, record, timeout_s)


async def _run_requests(client, requests: list[BenchRequest], config: ServeConfig,
                        model: str = "") -> tuple[list[RequestRecord], float]:
    from tqdm.auto import tqdm

    records = [RequestRecord(r.input_len, r.output_len, 0.0) for r in requests]
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    bar = tqdm(total=len(requests), desc=f"requests (rate {config.request_rate})",
               disable=not config.use_tqdm, dynamic_ncols=True)

    async def limited(request: BenchRequest, record: RequestRecord) -> None:
        if semaphore is None:
            await send_request(client, config.backend, model, request, record,
                               config.request_timeout_s)
        else:
            async with semaphore:
                await send_request(client, config.backend, model, request, record,
                                   config.request_timeout_s)
        bar.update(1)

    start = time.perf_counter()
    tasks = []
    for request, record, delay in zip(requests, records,
                                      arrival_delays(len(requests), config.request_rate,
                                                     config.seed), strict=False):
        tasks.append(asyncio.create_task(limited(request, record)))
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return records, duration


async def run_serve_async(config: ServeConfig) -> dict[str, Any]:
    """Run one serving benchmark against ``config.target``; returns a JSON-ready dict."""
    if config.backend == "openai":
        from gridllm.bench.http_client import HttpClient

        client_context: Any = HttpClient(config.target, api_key=config.api_key)
    else:
        from gridllm.client import AsyncClient

        client_context = AsyncClient(config.target, api_key=config.api_key)
    async with client_context as client:
        info = await _model_info(client, config.backend)
        excluded = [] if info.eos_token_id is None else [info.eos_token_id]
        requests = random_requests(config.num_prompts, config.input_len_range,
                                   config.output_len_range, info.vocab_size, seed=config.seed,
                                   excluded_token_ids=excluded)
        longest = config.input_len_range[1] + config.output_len_range[1]
        if info.max_model_len and longest > info.max_model_len:
            logger.warning("input + output up to %d tokens exceeds the server's max_model_len "
                           "%d: some requests will be rejected", longest, info.max_model_len)
        records, duration = await _run_requests(client, requests, config, info.model)
    failures = [r.error for r in records if r.error]
    if failures:
        logger.warning("%d of %d requests failed; first: %s", len(failures), len(records),
                       failures[0])
    config_dict = asdict(config)
    config_dict["request_rate"] = _rate_json(config.request_rate)
    config_dict.pop("use_tqdm")
    config_dict.pop("api_key")
    return {"benchmark": "serve", "model": info.model, "client_machine": machine_info("cpu"),
            "config": config_dict, **compute_serve_metrics(records, duration),
            "first_errors": failures[:3]}


async def _model_info(client, backend: str):
    if backend != "openai":
        return await client.model_info()
    card = (await client.get_json("/v1/models"))["data"][0]
    if "vocab_size" not in card:
        raise RuntimeError("the server's /v1/models names no vocab_size (is it gridllm?)")
    return SimpleNamespace(model=card["id"], vocab_size=card["vocab_size"],
                           eos_token_id=card.get("eos_token_id"),
                           max_model_len=card.get("max_model_len"))


def run_serve(config: ServeConfig) -> dict[str, Any]:
    return asyncio.run(run_serve_async(config))


def run_sweep(config: ServeConfig, rates: list[float]) -> dict[str, Any]:
    """One serving run per request rate, in the order given."""
    runs = [run_serve(replace(config, request_rate=rate)) for rate in rates]
    return {"benchmark": "serve_sweep", "model": runs[0]["model"] if runs else None,
            "rates": [_rate_json(r) for r in rates], "runs": runs}


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def parse_rates(text: str) -> list[float]:
    """``"1,2,inf"`` -> ``[1.0, 2.0, inf]`` (ValueError on a non-positive rate)."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--sweep must be positive rates separated by commas, got {text!r}.")
    return rates


def plot_sweep(sweep: dict[str, Any], path: str) -> None:
    """PNG of TTFT, TPOT and E2E latency (mean and p99) against output token throughput."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sweep["runs"]
    x = [r["output_tokens_per_s"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_latency_ms"),
                              ("TTFT", "TPOT", "end-to-end latency"), strict=False):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            ax.plot(x, [r[key][stat] for r in runs], style, label=stat)
        for xi, r in zip(x, runs, strict=False):
            ax.annotate(f"{r['config']['request_rate']}/s", (xi, r[key]["mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"gridllm serving sweep: {sweep['model']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_result(result: dict[str, Any]) -> str:
    """The printed table of one serving result or a sweep."""
    runs = result["runs"] if result.get("benchmark") == "serve_sweep" else [result]
    rows = [[str(r["config"]["request_rate"]), r["num_completed"], r["num_failed"],
             r["requests_per_s"], r["output_tokens_per_s"], r["ttft_ms"]["mean"],
             r["ttft_ms"]["p99"], r["tpot_ms"]["mean"], r["tpot_ms"]["p99"],
             r["itl_ms"]["p50"], r["e2e_latency_ms"]["mean"], r["e2e_latency_ms"]["p99"]]
            for r in runs]
    return (f"model {result['model']}\n" + format_table(
        rows, ["rate", "done", "failed", "req/s", "out tok/s", "TTFT mean", "TTFT p99",
               "TPOT mean", "TPOT p99", "ITL p50", "E2E mean", "E2E p99"])
            + "\n(latencies in ms)")


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help="router HOST:PORT (grpc) or http://HOST:PORT (openai)")
    p.add_argument("--backend", default="grpc", choices=BACKENDS,
                   help="grpc: the Generation service; openai: the HTTP API's streamed "
                        "/v1/completions (same workload and statistics)")
    p.add_argument("--launch", action="store_true",
                   help="start the local stack (as `gridllm up`) for --model and bench it")
    p.add_argument("--model", default=None, help="model for --launch")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", default="100:1024")
    p.add_argument("--output-len-range", default="100:1024")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--sweep", default=None, help="comma-separated request rates, e.g. 1,4,inf")
    p.add_argument("--plot", default=None, help="PNG path of the sweep (default: OUTPUT.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="with --launch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="with --launch")
    p.add_argument("--no-tqdm", dest="use_tqdm", action="store_false")
    p.add_argument("--api-key", default=None,
                   help="API key sent as `Authorization: Bearer KEY` (default: $GRIDLLM_API_KEY)")
    p.add_argument("--output", default=None, help="write the result as JSON here")


def launch_stack(model: str, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None,
                 scheduler_args: list[str] | None = None):
    """Start Redis, scheduler, one worker and the router (gRPC and HTTP) for ``model``
    (``gridllm up``); ``scheduler_args`` go to the scheduler only."""
    from gridllm.common.config import SchedulerConfig
    from gridllm.launcher import LocalStack, StackConfig
    from scheduler_svc.server import SchedulerServiceConfig

    given = (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens))
    budgets: dict[str, Any] = {name: value for name, value in given if value is not None}
    # The stack passes the budgets to the scheduler and sizes the workers by them.
    scheduler_options = SchedulerServiceConfig(scheduler_config=SchedulerConfig(**budgets))
    stack = LocalStack(StackConfig(model=model, port=0, http_port=0,
                                   scheduler_options=scheduler_options,
                                   extra_scheduler_args=list(scheduler_args or [])))
    stack.start()
    return stack


def stack_target(stack, backend: str) -> str:
    """Where ``backend`` reaches a launched stack."""
    return stack.http_endpoint if backend == "openai" else stack.endpoint


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'gridllm[plot]' "
                         "(or leave out --plot and --output)") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """``bench serve``; exit 1 when a requested plot could not be drawn (the JSON and the
    table are written first)."""
    if args.launch == bool(args.target):
        raise ValueError("pass exactly one of --target HOST:PORT or --launch --model M.")
    if args.launch and not args.model:
        raise ValueError("--launch needs --model.")
    rates = parse_rates(args.sweep) if args.sweep else None
    plot = args.plot or (args.output.rsplit(".", 1)[0] + ".png" if args.output else None)
    if rates and plot:
        _check_plotting()  # before the sweep: it may run for many minutes
    stack = launch_stack(args.model, args.max_num_seqs,
                         args.max_num_batched_tokens) if args.launch else None
    plot_error = None
    try:
        config = ServeConfig(
            target=(stack_target(stack, args.backend) if stack else args.target),
            num_prompts=args.num_prompts, backend=args.backend,
            input_len_range=parse_range(args.input_len_range, "--input-len-range"),
            output_len_range=parse_range(args.output_len_range, "--output-len-range"),
            request_rate=args.request_rate, max_concurrency=args.max_concurrency,
            seed=args.seed, request_timeout_s=args.request_timeout, use_tqdm=args.use_tqdm,
            api_key=args.api_key)
        if rates:
            result = run_sweep(config, rates)
            if plot:
                try:
                    plot_sweep(result, plot)
                    result["plot"] = plot
                except Exception as exc:  # noqa: BLE001 - reported, and the exit code says so
                    plot_error = exc
        else:
            result = run_serve(config)
    finally:
        if stack is not None:
            stack.stop()
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    if plot_error is not None:
        logger.error("plotting the sweep into %s failed: %s: %s", plot,
                     type(plot_error).__name__, plot_error)
        return 1
    return 0
