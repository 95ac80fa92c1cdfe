"""FP8 KV cache and FP8 weights on real SmolLM2-135M weights (CPU: the fake-quantization
path of the same code), against transformers' own bf16-vs-fp32 difference, on the measure
of ``gridllm.bench.quant_accuracy`` (top-1 agreement, max logit error; the mean KL
divergence is printed).

The goal is that a quantized variant agrees at least as often as transformers bf16 and
errs at most as much. e4m3 keeps 3 mantissa bits against bfloat16's 7, and no FP8 setting
reaches that goal on this measure (see docs/serving.md for the figures; the FP8 KV cache is
measured with scales of 1.0, with per-layer scales calibrated on other text and loaded
from a checkpoint as an FP8 checkpoint's KV-cache scales are, and with the scales the
worker computes at load, ``calculate_kv_scales``; SmolLM2's keys and values sit inside
e4m3's range, so on it the three differ by rounding noise only; and as e5m2, whose one
fewer mantissa bit costs more): the goal
is kept as a strict xfail (it reports XPASS, and fails, the day it holds), and each
setting is held to FP8 bounds that a wrong scale, a lost clamp or a misread cache breaks
by far: top-1 agreement at least ``FP8_MIN_AGREEMENT`` and a max logit error at most
``FP8_MAX_ERROR_VS_BF16`` times bf16's. gridllm's unquantized fp32 run is measured the
same way, so the harness itself is checked (it must agree everywhere, with a tiny error).
"""

from __future__ import annotations

import pytest
import torch

from gridllm.bench.accuracy import DEFAULT_PROMPTS
from gridllm.bench.quant_accuracy import (
    kv_amax,
    measure_bf16,
    measure_model,
    reference_cases,
)
from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.presets import is_preset_available
from worker_svc.layers.quantization import Fp8Linear

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                       reason="smollm2-135m is not in the cache (make test fetches it)"),
]

# 16 prompts x 32 predictions: 512 positions, so that a few near ties flipping with the
# rounding move the agreement by little (at 64 positions one flip was 1.6 points).
PROMPTS = DEFAULT_PROMPTS
NUM_NEW = 32
# Bounds of an FP8 setting against the fp32 reference (see the module docstring).
FP8_MIN_AGREEMENT = 0.85
FP8_MAX_ERROR_VS_BF16 = 4.0


# Calibration text for the KV-cache scales: none of PROMPTS.
CALIBRATION = [
    "Machine learning models are trained on large datasets of text and code.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())",
]
# Calibrated scale = amax / this: the largest calibrated key or value lands at 224, half
# of e4m3's range, leaving room for larger ones in other text.
KV_SCALE_HEADROOM = 224.0


def _calibrated_kv_scales(model, tokenizer) -> list[tuple[float, float]]:
    """Per layer ``(k_scale, v_scale)``: amax over CALIBRATION's keys and values (one
    float32 prefill) / KV_SCALE_HEADROOM."""
    amax = kv_amax(model, [tokenizer(text).input_ids for text in CALIBRATION])
    return [(k / KV_SCALE_HEADROOM, v / KV_SCALE_HEADROOM) for k, v in amax]


# The variant whose scales the worker computes at load (calculate_kv_scales).
CALCULATE = "calculate_kv_scales"


def _calculated_scales_model():
    from worker_svc.model_runner import ModelRunner

    runner = ModelRunner(ModelConfig("smollm2-135m", device="cpu", dtype="float32",
                                     attention_backend="torch", max_model_len=512),
                         CacheConfig(num_kv_blocks=4, kv_cache_dtype="fp8",
                                     calculate_kv_scales=True), SchedulerConfig())
    assert all(layer.self_attn.kv_scales is not None for layer in runner.model.model.layers)
    return runner.model


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.worker_svc.fp8_checkpoints import write_kv_scales_checkpoint
    from worker_svc.loader import load_model, resolve_model_path

    model_dir = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = reference_cases(model_dir, [tokenizer(text).input_ids for text in PROMPTS],
                            NUM_NEW)
    results = {"transformers bf16": measure_bf16(cases)}
    print("transformers bf16", results["transformers bf16"], flush=True)
    variants = {"gridllm fp32": ("smollm2-135m", None, torch.float32),
                "gridllm fp8 kv cache": ("smollm2-135m", None, torch.float8_e4m3fn),
                "gridllm fp8 kv cache, calibrated scales": (None, None, torch.float8_e4m3fn),
                "gridllm fp8 kv cache, calculate_kv_scales": (CALCULATE, None,
                                                              torch.float8_e4m3fn),
                "gridllm fp8_e5m2 kv cache": ("smollm2-135m", None, torch.float8_e5m2),
                "gridllm fp8 weights": ("smollm2-135m", "fp8", torch.float32)}
    for name, (model_name, quantization, kv_dtype) in variants.items():
        if model_name is None:  # a checkpoint of the same weights with KV-cache scales
            float_model, _ = load_model(ModelConfig("smollm2-135m", device="cpu",
                                                    dtype="float32", attention_backend="torch"))
            scales = _calibrated_kv_scales(float_model, tokenizer)
            model_name = write_kv_scales_checkpoint(
                model_dir, str(tmp_path_factory.mktemp("smollm2-kv") / "model"), scales)
        if model_name == CALCULATE:  # the worker's scales at load, through its runner
            model = _calculated_scales_model()
        else:
            model, _ = load_model(ModelConfig(model_name, device="cpu", dtype="float32",
                                              attention_backend="torch",
                                              quantization=quantization))
        if model_name not in ("smollm2-135m", CALCULATE):
            assert [layer.self_attn.kv_scales for layer in model.model.layers] == [
                pytest.approx(pair) for pair in scales]
        if quantization == "fp8":
            assert any(isinstance(m, Fp8Linear) for m in model.modules())
        results[name] = measure_model(model, cases, kv_dtype, NUM_NEW)
        print(name, results[name], flush=True)
    for name, (agree, error, kl) in results.items():
        print(f"{name:42s} top-1 agreement {agree:.4f}  max logit error {error:.4f}  "
              f"mean KL {kl:.5f}")
    return results


def test_harness_reproduces_fp32(accuracy):
    agree, error, kl = accuracy["gridllm fp32"]
    assert agree == 1.0 and error < 1e-2 and kl < 1e-6


FP8_VARIANTS = ["gridllm fp8 kv cache", "gridllm fp8 kv cache, calibrated scales",
                "gridllm fp8 kv cache, calculate_kv_scales", "gridllm fp8_e5m2 kv cache",
                "gridllm fp8 weights"]


@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_stays_within_fp8_bounds(accuracy, variant):
    agree, error, _ = accuracy[variant]
    bf16_error = accuracy["transformers bf16"][1]
    assert agree >= FP8_MIN_AGREEMENT, (variant, agree)
    assert error <= FP8_MAX_ERROR_VS_BF16 * bf16_error, (variant, error, bf16_error)
    assert error > accuracy["gridllm fp32"][1]  # the setting did quantize


@pytest.mark.xfail(strict=True, reason="e4m3 rounds more coarsely than bfloat16: FP8 "
                   "changes more next-token predictions than transformers bf16 does")
@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_changes_outputs_no_more_than_bf16(accuracy, variant):
    agree, error, _ = accuracy[variant]
    bf16_agree, bf16_error, _ = accuracy["transformers bf16"]
    assert agree >= bf16_agree, (variant, agree, bf16_agree)
    assert error <= bf16_error, (variant, error, bf16_error)
