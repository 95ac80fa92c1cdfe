"""Shared pieces of the benchmark results: machine description, tables, JSON files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

# The environment variables that switch the worker's kernel paths (docs/architecture.md),
# recorded with each result where set, so an A/B run's files say which side they are.
KERNEL_SWITCHES = ("GRIDLLM_GEMV_MAX_ROWS", "GRIDLLM_LAUNCH_DEPENDENT", "GRIDLLM_FP8_WORDS",
                   "GRIDLLM_PREFILL_TMA", "GRIDLLM_GLUON_PREFILL", "GRIDLLM_GLUON_DECODE",
                   "GRIDLLM_MMA_GEMV", "GRIDLLM_GEMV_F16", "GRIDLLM_SPLIT_ONE_TOKEN",
                   "GRIDLLM_PIECEWISE_GRAPHS", "GRIDLLM_PIECEWISE_MAX_TOKENS",
                   "GRIDLLM_CHUNK_ATTENTION", "GRIDLLM_DIRECT_LAUNCH", "GRIDLLM_EARLY_READS")


def machine_info(device: str = "auto") -> dict[str, Any]:
    """Card (or CPU) name, core count, UTC date and the kernel switches set in the
    environment (``KERNEL_SWITCHES``), recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "kernel_switches": {name: os.environ[name] for name in KERNEL_SWITCHES
                            if name in os.environ},
    }
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name(0) if use_cuda else "cpu"
    return info


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers (floats with 2 decimals)."""
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:,.2f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(row, widths, strict=False))) for row in cells]
    return "\n".join(lines)


def write_json(path: str | None, result: Any) -> None:
    """Write ``result`` to ``path`` (creating its directory); nothing if ``path`` is None."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)
        f.write("\n")
