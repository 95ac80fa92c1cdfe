"""FP8 KV cache and FP8 weights on real SmolLM2-135M weights (CPU: the fake-quantization
path of the same code), against transformers' own bf16-vs-fp32 difference.

The measure, on a fixed prompt set: transformers fp32 generates a greedy continuation of
each prompt (the reference sequence); every variant then predicts each next token along
that sequence (teacher-forced: gridllm through a prefill of the prompt and one decode step
per token, so both attention paths read the cache). Per variant:

- top-1 agreement: the fraction of positions where its argmax is the fp32 argmax;
- max logit error: the largest |logit - fp32 logit| over positions and vocabulary.

The goal is that a quantized variant agrees at least as often as transformers bf16 and
errs at most as much. e4m3 keeps 3 mantissa bits against bfloat16's 7, and no FP8 setting
reaches that goal on this measure (see docs/serving.md for the figures; the FP8 KV cache is
measured with scales of 1.0 and with per-layer scales calibrated on other text, loaded from
a checkpoint as an FP8 checkpoint's KV-cache scales are): the goal
is kept as a strict xfail (it reports XPASS, and fails, the day it holds), and each
setting is held to FP8 bounds that a wrong scale, a lost clamp or a misread cache breaks
by far: top-1 agreement at least ``FP8_MIN_AGREEMENT`` and a max logit error at most
``FP8_MAX_ERROR_VS_BF16`` times bf16's. gridllm's unquantized fp32 run is measured the
same way, so the harness itself is checked (it must agree everywhere, with a tiny error).
"""

from __future__ import annotations

import pytest
import torch

from gridllm.common.config import ModelConfig
from gridllm.common.presets import is_preset_available
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.quantization import Fp8Linear

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                       reason="smollm2-135m is not in the cache (make test fetches it)"),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
NUM_NEW = 16
BLOCK_SIZE = 16
# Bounds of an FP8 setting against the fp32 reference (see the module docstring).
FP8_MIN_AGREEMENT = 0.85
FP8_MAX_ERROR_VS_BF16 = 4.0


def _reference(model_dir: str):
    """Per prompt: the fp32 greedy sequence, its prompt length, fp32 and bf16 logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    cases = []
    with torch.no_grad():
        for text in PROMPTS:
            prompt = tokenizer(text, return_tensors="pt").input_ids
            seq = fp32.generate(prompt, max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones_like(prompt))[0]
            n = prompt.shape[1]
            rows = slice(n - 1, len(seq) - 1)  # the positions that predict the new tokens
            ref = fp32(seq[None]).logits[0, rows].float()
            half = bf16(seq[None]).logits[0, rows].float()
            cases.append((seq, n, ref, half))
    return cases


def _teacher_forced_logits(model, cases, kv_dtype: torch.dtype,
                           num_new: int = NUM_NEW) -> list[torch.Tensor]:
    """Per case, the logits predicting ``seq[prompt_len:]``: one step prefills every
    prompt, then each step decodes one reference token of every sequence, over a paged
    cache of ``kv_dtype`` (left on ``model.last_caches``)."""
    config = model.config
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = max(-(-len(seq) // BLOCK_SIZE) for seq, *_ in cases)
    shape = (width * len(cases), BLOCK_SIZE, num_kv_heads, head_dim)
    caches = [(torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
              for _ in range(config.num_hidden_layers)]
    tables = torch.arange(width * len(cases), dtype=torch.int32).view(len(cases), width)
    # Step 0: every prompt whole; step j > 0: token prompt_len + j - 1 of every sequence.
    steps = [[(0, n) for _, n, *_ in cases]]
    steps += [[(n + j - 1, n + j) for _, n, *_ in cases] for j in range(1, num_new)]
    logits: list[list[torch.Tensor]] = [[] for _ in cases]
    with torch.inference_mode():
        for spans in steps:
            positions = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in spans])
            slots = torch.cat([tables[i, torch.arange(a, b) // BLOCK_SIZE].long() * BLOCK_SIZE
                               + torch.arange(a, b) % BLOCK_SIZE
                               for i, (a, b) in enumerate(spans)])
            ids = torch.cat([seq[a:b] for (seq, *_), (a, b) in zip(cases, spans, strict=True)])
            lens = torch.tensor([b - a for a, b in spans])
            starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
            metadata = AttentionMetadata(
                slot_mapping=slots, query_start_loc=starts.int(),
                seq_lens=torch.tensor([b for _, b in spans], dtype=torch.int32),
                block_tables=tables, max_query_len=int(lens.max()),
                max_seq_len=max(b for _, b in spans))
            hidden = model(ids.int(), positions, caches, metadata)
            last = model.compute_logits(hidden[starts[1:] - 1])
            for i in range(len(cases)):
                logits[i].append(last[i:i + 1])
    model.last_caches = caches
    return [torch.cat(rows) for rows in logits]


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
    cases = [(ids, len(ids)) for ids in (tokenizer(text, return_tensors="pt").input_ids[0]
                                         for text in CALIBRATION)]
    _teacher_forced_logits(model, cases, torch.float32, num_new=1)
    return [(float(k.abs().max()) / KV_SCALE_HEADROOM, float(v.abs().max()) / KV_SCALE_HEADROOM)
            for k, v in model.last_caches]


def _measure(pairs) -> tuple[float, float]:
    """``(mean top-1 agreement, max |logit error|)`` over ``(logits, reference)`` pairs."""
    agree = torch.cat([(out.argmax(-1) == ref.argmax(-1)).float() for out, ref in pairs])
    error = max(float((out - ref).abs().max()) for out, ref in pairs)
    return float(agree.mean()), error


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.worker_svc.fp8_checkpoints import write_kv_scales_checkpoint
    from worker_svc.loader import load_model, resolve_model_path

    model_dir = resolve_model_path("smollm2-135m")
    cases = _reference(model_dir)
    results = {"transformers bf16": _measure([(half, ref) for _, _, ref, half in cases])}
    print("transformers bf16", results["transformers bf16"], flush=True)
    variants = {"gridllm fp32": ("smollm2-135m", None, torch.float32),
                "gridllm fp8 kv cache": ("smollm2-135m", None, torch.float8_e4m3fn),
                "gridllm fp8 kv cache, calibrated scales": (None, None, torch.float8_e4m3fn),
                "gridllm fp8 weights": ("smollm2-135m", "fp8", torch.float32)}
    for name, (model_name, quantization, kv_dtype) in variants.items():
        if model_name is None:  # a checkpoint of the same weights with KV-cache scales
            float_model, _ = load_model(ModelConfig("smollm2-135m", device="cpu",
                                                    dtype="float32", attention_backend="torch"))
            scales = _calibrated_kv_scales(float_model,
                                           AutoTokenizer.from_pretrained(model_dir))
            model_name = write_kv_scales_checkpoint(
                model_dir, str(tmp_path_factory.mktemp("smollm2-kv") / "model"), scales)
        model, _ = load_model(ModelConfig(model_name, device="cpu", dtype="float32",
                                          attention_backend="torch",
                                          quantization=quantization))
        if model_name != "smollm2-135m":
            assert [layer.self_attn.kv_scales for layer in model.model.layers] == [
                pytest.approx(pair) for pair in scales]
        if quantization == "fp8":
            assert any(isinstance(m, Fp8Linear) for m in model.modules())
        logits = _teacher_forced_logits(model, cases, kv_dtype)
        results[name] = _measure([(out, ref) for out, (_, _, ref, _) in
                                  zip(logits, cases, strict=True)])
        print(name, results[name], flush=True)
    for name, (agree, error) in results.items():
        print(f"{name:40s} top-1 agreement {agree:.4f}  max logit error {error:.4f}")
    return results


def test_harness_reproduces_fp32(accuracy):
    agree, error = accuracy["gridllm fp32"]
    assert agree == 1.0 and error < 1e-2


FP8_VARIANTS = ["gridllm fp8 kv cache", "gridllm fp8 kv cache, calibrated scales",
                "gridllm fp8 weights"]


def test_calibrated_kv_cache_scales_beat_scales_of_one(accuracy):
    """Per-layer scales calibrated on other text (an FP8 checkpoint's KV-cache scales) put
    small keys and values out of e4m3's subnormal range: fewer changed predictions and a
    smaller largest logit error than scales of 1.0."""
    agree, error = accuracy["gridllm fp8 kv cache, calibrated scales"]
    plain_agree, plain_error = accuracy["gridllm fp8 kv cache"]
    assert agree >= plain_agree and error < plain_error, (agree, error, plain_agree,
                                                          plain_error)


@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_stays_within_fp8_bounds(accuracy, variant):
    agree, error = accuracy[variant]
    bf16_error = accuracy["transformers bf16"][1]
    assert agree >= FP8_MIN_AGREEMENT, (variant, agree)
    assert error <= FP8_MAX_ERROR_VS_BF16 * bf16_error, (variant, error, bf16_error)
    assert error > accuracy["gridllm fp32"][1]  # the setting did quantize


@pytest.mark.xfail(strict=True, reason="e4m3 rounds more coarsely than bfloat16: FP8 "
                   "changes more next-token predictions than transformers bf16 does")
@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_changes_outputs_no_more_than_bf16(accuracy, variant):
    agree, error = accuracy[variant]
    bf16_agree, bf16_error = accuracy["transformers bf16"]
    assert agree >= bf16_agree, (variant, agree, bf16_agree)
    assert error <= bf16_error, (variant, error, bf16_error)
