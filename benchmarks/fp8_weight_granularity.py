"""What rounding SmolLM2-135M's linear weights to e4m3 costs its predictions, by how finely
the weights are scaled (CPU, real weights).

Each row rounds the decoder's linear weights (q/k/v, o, gate/up, down; as
``quantization="fp8"`` does) to e4m3 and back to float32 with one scale (``amax / 448``)
per tensor, per output channel (what gridllm serves), or per group of ``G`` consecutive
inputs of a channel, and leaves everything else in float32: the weights' own rounding,
without activation quantization or a kernel. A row rounding the same weights to bfloat16
shows how much of transformers bfloat16's difference is its weights. Measured as
``tests/worker_svc/test_fp8_accuracy.py`` measures (``gridllm.bench.quant_accuracy``:
teacher-forced along transformers fp32's greedy continuations, top-1 agreement, max logit
error, mean KL from fp32), next to transformers bfloat16 and gridllm as served with
``quantization="fp8"``.

    python benchmarks/fp8_weight_granularity.py [--groups 64 16] [--num-new 32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.accuracy import DEFAULT_PROMPTS as PROMPTS  # noqa: E402
from gridllm.bench.report import write_json  # noqa: E402
from kernels.fp8 import FP8_DTYPE, FP8_MAX  # noqa: E402
from worker_svc.layers.quantization import FP8_LINEAR_NAMES  # noqa: E402


def round_trip(w: torch.Tensor, granularity: str | int) -> torch.Tensor:
    """``w [out, in]`` rounded to e4m3 with a float32 scale (``amax / 448``) per
    ``"tensor"``, per ``"channel"`` (output row) or per group of ``granularity`` inputs,
    then scaled back; ``"bf16"``: rounded to bfloat16 instead."""
    if granularity == "bf16":
        return w.bfloat16().float()
    n, k = w.shape
    if granularity == "tensor":
        groups = w.reshape(1, 1, n * k)
    elif granularity == "channel":
        groups = w.reshape(n, 1, k)
    else:
        if k % granularity:
            raise ValueError(f"group {granularity} does not divide the inputs ({k}).")
        groups = w.reshape(n, k // granularity, granularity)
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((groups / scale).to(FP8_DTYPE).float() * scale).reshape(n, k)


def main() -> None:
    from gridllm.bench.quant_accuracy import (
        format_rows,
        measure_bf16,
        measure_model,
        result_row,
        text_cases,
    )
    from gridllm.common.config import ModelConfig
    from worker_svc.loader import load_model, resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 16],
                        help="input-group sizes to scale by (divisors of 576 and 1536)")
    parser.add_argument("--num-new", type=int, default=32)
    parser.add_argument("--output", default=None, help="write results as JSON here")
    args = parser.parse_args()
    model_dir = resolve_model_path("smollm2-135m")
    cases = text_cases(model_dir, PROMPTS, args.num_new)
    rows = [result_row("transformers bfloat16", measure_bf16(cases))]

    def model(quantization=None):
        built, _ = load_model(ModelConfig("smollm2-135m", device="cpu", dtype="float32",
                                          attention_backend="torch",
                                          quantization=quantization))
        return built

    rows.append(result_row("gridllm quantization=fp8 (as served)",
                           measure_model(model("fp8"), cases, torch.float32, args.num_new)))
    for granularity in ["tensor", "channel", *args.groups, "bf16"]:
        plain = model()
        with torch.no_grad():
            for name, module in plain.named_modules():
                if name.rsplit(".", 1)[-1] in FP8_LINEAR_NAMES:
                    module.weight.copy_(round_trip(module.weight.float(), granularity))
        label = ("weights rounded to bfloat16" if granularity == "bf16" else
                 f"weights e4m3, a scale per {granularity}" if isinstance(granularity, str)
                 else f"weights e4m3, a scale per {granularity} inputs")
        rows.append(result_row(label, measure_model(plain, cases, torch.float32,
                                                    args.num_new)))
        print(format_rows(rows[-1:]), flush=True)
    print(format_rows(rows))
    write_json(args.output, {"results": rows})


if __name__ == "__main__":
    main()
