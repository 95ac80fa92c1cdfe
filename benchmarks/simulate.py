"""The cluster simulator: how a gridllm fleet behaves at 8-1,000 workers, per routing policy,
under shared-prefix traffic (few-shot templates, chat sessions).

The real scheduler core, worker pick, KV events, prefix index and routing policy run
against simulated workers whose step time follows a cost model fitted to the H100
llama3-8b figures of docs/performance.md (gridllm/bench/sim/cost.py states the parameters;
``--fit`` fits the prefill term again). See gridllm/bench/sim/cluster.py for what is real
and what is simulated, and gridllm/bench/sim/workloads.py for the traffic.

Usage:
    python benchmarks/simulate.py --quick                      # CI size, seconds
    python benchmarks/simulate.py --output docs/simulate.json  # 8, 64, 512 workers, minutes
    python benchmarks/simulate.py --workers 8,64,512,1000 ...  # up to 1,000 workers
Writes a table, the results as JSON (--output) and a plot (--plot, default next to the
JSON as .png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.report import format_table  # noqa: E402
from gridllm.bench.sim.cluster import FleetConfig, Simulation, summarize  # noqa: E402
from gridllm.bench.sim.cost import LLAMA3_8B_H100  # noqa: E402
from gridllm.bench.sim.workloads import WORKLOADS, WorkloadConfig, add_workload  # noqa: E402
from gridllm.common.routing_policy import POLICY_NAMES  # noqa: E402

QUICK_WORKLOAD = WorkloadConfig(requests_per_worker=4, sessions_per_worker=1,
                                turns_per_session=3)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_one(workload: str, num_workers: int, policy: str, fleet: FleetConfig,
            traffic: WorkloadConfig, cost=LLAMA3_8B_H100) -> dict:
    """One simulation; its summary as a JSON-ready dict."""
    start = time.perf_counter()
    sim = Simulation(dataclasses.replace(fleet, num_workers=num_workers,
                                         routing_policy=policy), cost)
    add_workload(sim, workload, traffic)
    sim.run()
    result = summarize(sim)
    return {"workload": workload, "num_workers": num_workers, "policy": policy,
            "num_requests": result.num_requests, "num_finished": result.num_finished,
            "hit_rate": result.hit_rate,
            "ttft_ms": {"p50": _ms(percentile(result.ttft_s, 0.5)),
                        "p99": _ms(percentile(result.ttft_s, 0.99)),
                        "mean": _ms(statistics.fmean(result.ttft_s) if result.ttft_s
                                    else None)},
            "e2e_ms_mean": _ms(statistics.fmean(result.e2e_s) if result.e2e_s else None),
            "output_tokens_per_s": (result.num_output_tokens / result.sim_duration_s
                                    if result.sim_duration_s else 0.0),
            "imbalance": result.imbalance, "num_steps": result.num_steps,
            "num_preemptions": result.num_preemptions,
            "wall_s": time.perf_counter() - start}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in results}, key=WORKLOADS.index)
    panels = (("hit_rate", "prefix-cache hit rate", None),
              ("ttft_ms", "TTFT p50 (ms)", "p50"), ("ttft_ms", "TTFT p99 (ms)", "p99"))
    fig, axes = plt.subplots(len(workloads), len(panels), squeeze=False,
                             figsize=(5 * len(panels), 3.8 * len(workloads)))
    for row, workload in enumerate(workloads):
        for col, (key, label, stat) in enumerate(panels):
            ax = axes[row][col]
            for policy in POLICY_NAMES:
                runs = sorted((r for r in results if r["workload"] == workload
                               and r["policy"] == policy), key=lambda r: r["num_workers"])
                if not runs:
                    continue
                ys = [r[key][stat] if stat else r[key] for r in runs]
                ax.plot([r["num_workers"] for r in runs], ys, "o-", label=policy)
            ax.set_xscale("log")
            ax.set_xlabel("workers")
            ax.set_ylabel(label)
            ax.set_title(f"{workload}: {label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: 8 and 32 workers, a few requests each (seconds)")
    parser.add_argument("--workers", default=None, help="comma-separated fleet sizes "
                        "(default 8,64,512; --quick: 8,32)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--workers-per-scheduler", type=int, default=4)
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--num-kv-blocks", type=int, default=4096, help="per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit", action="store_true",
                        help="fit the cost model's prefill term again and print it")
    parser.add_argument("--output", default=None, help="JSON of every run")
    parser.add_argument("--plot", default=None, help="PNG (default: OUTPUT with .png)")
    args = parser.parse_args(argv)
    if args.fit:
        from gridllm.bench.sim.fit import fit_prefill, simulated_wall_s

        fitted = fit_prefill(LLAMA3_8B_H100)
        print(f"fitted {fitted} (simulated wall {simulated_wall_s(fitted):.3f} s)")
        return 0
    sizes = [int(x) for x in (args.workers or ("8,32" if args.quick else "8,64,512")).split(",")]
    fleet = FleetConfig(workers_per_scheduler=args.workers_per_scheduler,
                        num_routers=args.routers, num_kv_blocks=args.num_kv_blocks,
                        seed=args.seed)
    traffic = dataclasses.replace(QUICK_WORKLOAD if args.quick else WorkloadConfig(),
                                  seed=args.seed)
    results = []
    for workload in args.workloads.split(","):
        for num_workers in sizes:
            for policy in args.policies.split(","):
                result = run_one(workload, num_workers, policy, fleet, traffic)
                results.append(result)
                print(f"{workload} {num_workers} {policy}: hit {result['hit_rate']:.3f}, "
                      f"TTFT p50 {result['ttft_ms']['p50']:.0f} ms, "
                      f"({result['wall_s']:.1f} s)", flush=True)
    rows = [[r["workload"], r["num_workers"], r["policy"], r["hit_rate"],
             r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], r["e2e_ms_mean"],
             r["output_tokens_per_s"], r["imbalance"], r["num_finished"]] for r in results]
    print(format_table(rows, ["workload", "workers", "policy", "hit rate", "TTFT p50",
                              "TTFT p99", "E2E mean", "out tok/s", "imbalance", "done"])
          + "\n(simulated ms; imbalance: busiest worker's busy time / the mean)")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"benchmark": "simulate", "cost_model": dataclasses.asdict(LLAMA3_8B_H100),
                       "fleet": dataclasses.asdict(fleet), "workload": dataclasses.asdict(traffic),
                       "results": results}, f, indent=1)
    plot_path = args.plot or (args.output.rsplit(".", 1)[0] + ".png" if args.output else None)
    if plot_path:
        plot(results, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
