"""How an FP8 KV cache's scales change SmolLM2-135M's predictions (CPU, real weights).

Each row is one choice of per-layer ``(k_scale, v_scale)``: 1.0 (no calibrated scales),
and the scales ``calculate_kv_scales`` computes at load (the largest key and value over
its calibration set over 224) rescaled to put that largest value at other points of
e4m3's range (448: none to spare; 100: room for values 4.5 times larger). Each is measured
as ``tests/worker_svc/test_fp8_accuracy.py`` measures (``gridllm.bench.quant_accuracy``:
teacher-forced along transformers fp32's greedy continuations, top-1 agreement, max logit
error, mean KL from fp32), on a larger prompt set than the test's, next to transformers
bfloat16, an e5m2 cache (``kv_cache_dtype="fp8_e5m2"``), and an FP8 KV cache of the
model's keys and values multiplied by 2^12 (the same function, keys and values past
e4m3's range), where the scales decide everything.

    python benchmarks/fp8_kv_scales.py [--num-new 32] [--output r.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.accuracy import DEFAULT_PROMPTS as PROMPTS  # noqa: E402
from gridllm.bench.report import write_json  # noqa: E402

# Where the calibration set's largest |key| / |value| lands in e4m3's range (448 at most).
HEADROOMS = (448.0, 224.0, 100.0)


def _runner(model: str, calculate: bool):
    from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
    from worker_svc.model_runner import ModelRunner

    return ModelRunner(ModelConfig(model, device="cpu", dtype="float32",
                                   attention_backend="torch", max_model_len=512),
                       CacheConfig(num_kv_blocks=4, kv_cache_dtype="fp8",
                                   calculate_kv_scales=calculate), SchedulerConfig())


def _set_scales(model, scales) -> None:
    for layer, pair in zip(model.model.layers, scales, strict=True):
        layer.self_attn.kv_scales = pair


def main() -> None:
    from gridllm.bench.quant_accuracy import (
        format_rows,
        measure_bf16,
        measure_model,
        result_row,
        text_cases,
        write_rescaled_kv_checkpoint,
    )
    from worker_svc.kv_calibration import KV_SCALE_HEADROOM
    from worker_svc.loader import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-new", type=int, default=32, help="tokens predicted a prompt")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model_dir = resolve_model_path("smollm2-135m")
    cases = text_cases(model_dir, PROMPTS, args.num_new)

    def row(name, model, kv_dtype=torch.float8_e4m3fn):
        measured = measure_model(model, cases, kv_dtype, args.num_new)
        print(f"{name}: {measured[0]:.4f} {measured[1]:.3f} {measured[2]:.5f}", flush=True)
        return result_row(name, measured)

    results = [result_row("transformers bfloat16", measure_bf16(cases))]
    calculated = _runner(model_dir, True).model
    results.append(row("float32 cache", calculated, torch.float32))
    computed = [layer.self_attn.kv_scales for layer in calculated.model.layers]
    _set_scales(calculated, [(1.0, 1.0)] * len(computed))
    results.append(row("fp8, scales 1.0", calculated))
    for headroom in HEADROOMS:
        ratio = KV_SCALE_HEADROOM / headroom
        _set_scales(calculated, [(k * ratio, v * ratio) for k, v in computed])
        results.append(row(f"fp8, calibration amax at {headroom:g}", calculated))
    _set_scales(calculated, [(1.0, 1.0)] * len(computed))
    results.append(row("fp8_e5m2, scales 1.0", calculated, torch.float8_e5m2))
    with tempfile.TemporaryDirectory() as tmp:
        scaled = write_rescaled_kv_checkpoint(model_dir, os.path.join(tmp, "m"), 2.0 ** 12)
        results.append(row("k, v x 2^12: fp8, scales 1.0", _runner(scaled, False).model))
        results.append(row("k, v x 2^12: fp8, calculate_kv_scales",
                           _runner(scaled, True).model))
    print(f"SmolLM2-135M (float32, CPU), {len(PROMPTS)} prompts x {args.num_new} teacher-"
          f"forced predictions against transformers float32; the calibration amax of "
          f"calculate_kv_scales is at {KV_SCALE_HEADROOM:g}")
    print(format_rows(results))
    write_json(args.output, {"num_prompts": len(PROMPTS), "num_new": args.num_new,
                             "results": results})


if __name__ == "__main__":
    main()
