"""KV-cache scales computed at load (``calculate_kv_scales``): against the keys and values
transformers caches for the same calibration prompts."""

from __future__ import annotations

import pytest
import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.presets import is_preset_available
from worker_svc.kv_calibration import (
    CALIBRATION_TEXTS,
    KV_SCALE_HEADROOM,
    MAX_CALIBRATION_TOKENS,
    calibration_prompts,
)
from worker_svc.model_runner import ModelRunner


def _runner(model_dir: str, dtype: str = "float32", device: str = "cpu", **cache
            ) -> ModelRunner:
    return ModelRunner(ModelConfig(model=model_dir, device=device, dtype=dtype),
                       CacheConfig(num_kv_blocks=16, kv_cache_dtype="fp8", **cache),
                       SchedulerConfig())


def _layer_scales(runner: ModelRunner) -> list[tuple[float, float] | None]:
    return [layer.self_attn.kv_scales for layer in _decoder_layers(runner.model)]


def _decoder_layers(model):
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def _transformers_scales(model_dir: str, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """Per layer, the largest |key| and |value| in transformers' cache (fp32) over the
    prompts, over KV_SCALE_HEADROOM: written at every position, windowed layers too."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    amax = None
    with torch.no_grad():
        for ids in prompts:
            # A cache built without the config keeps every key (a windowed layer's own
            # would keep only its window).
            cache = model(torch.tensor([ids]), use_cache=True,
                          past_key_values=DynamicCache()).past_key_values
            seen = torch.tensor([[layer.keys.abs().max(), layer.values.abs().max()]
                                 for layer in cache.layers])
            amax = seen if amax is None else torch.maximum(amax, seen)
    return [(k / KV_SCALE_HEADROOM, v / KV_SCALE_HEADROOM) for k, v in amax.tolist()]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gemma2", "mistral-w12", "gemma3"])
def test_scales_are_the_largest_cached_keys_and_values(tiny_model_dir, arch):
    """Each layer's (k_scale, v_scale) is the largest key / value transformers caches over
    the calibration prompts (post-rotary keys, after q/k norms where the model has them),
    over the headroom; the scales of 1.0 are replaced."""
    model_dir = tiny_model_dir(arch)
    runner = _runner(model_dir, calculate_kv_scales=True)
    prompts = calibration_prompts(None, runner.vocab_size, runner.max_model_len)
    expected = _transformers_scales(model_dir, prompts)
    got = _layer_scales(runner)
    assert len(got) == len(expected)
    for (k, v), (k_ref, v_ref) in zip(got, expected, strict=True):
        assert k == pytest.approx(k_ref, rel=1e-4) and v == pytest.approx(v_ref, rel=1e-4)
    assert _layer_scales(_runner(model_dir)) == [None] * len(expected)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_scales_follow_the_model_dtype_and_serve(tiny_model_dir, device):
    """In bfloat16 the scales are measured on the bfloat16 model's keys, close to the CPU
    float32 run's (on CUDA: the Triton backend, CUDA graphs captured after the scales are
    set), and the runner then generates over its FP8 cache."""
    from gridllm import SamplingParams
    from tests.worker_svc.step_driver import run_requests

    model_dir = tiny_model_dir("llama")
    runner = _runner(model_dir, dtype="bfloat16", device=device, calculate_kv_scales=True)
    fp32 = _layer_scales(_runner(model_dir, calculate_kv_scales=True))
    for (k, v), (k32, v32) in zip(_layer_scales(runner), fp32, strict=True):
        assert k == pytest.approx(k32, rel=0.05) and v == pytest.approx(v32, rel=0.05)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs, _ = run_requests(runner, [[1, 5, 9, 12, 40], [7, 3, 3, 8]], params, 6)
    assert [len(o) for o in outputs] == [6, 6]


def test_calculated_scales_replace_a_checkpoints(tiny_model_dir, tmp_path):
    from tests.worker_svc.fp8_checkpoints import write_kv_scales_checkpoint

    model_dir = tiny_model_dir("llama")
    stored = [(0.5, 0.25), (0.125, 2.0)]
    checkpoint = write_kv_scales_checkpoint(model_dir, str(tmp_path / "model"), stored)
    assert _layer_scales(_runner(checkpoint)) == [pytest.approx(p) for p in stored]
    calculated = _layer_scales(_runner(model_dir, calculate_kv_scales=True))
    assert _layer_scales(_runner(checkpoint, calculate_kv_scales=True)) == calculated
    assert calculated != [pytest.approx(p) for p in stored]


def test_a_model_length_of_one_token_calibrates_on_single_tokens(tiny_model_dir):
    runner = ModelRunner(ModelConfig(model=tiny_model_dir("llama"), device="cpu",
                                     max_model_len=1),
                         CacheConfig(num_kv_blocks=4, kv_cache_dtype="fp8",
                                     calculate_kv_scales=True), SchedulerConfig())
    assert all(k > 0 and v > 0 for k, v in _layer_scales(runner))


def test_calculate_kv_scales_needs_an_fp8_cache():
    with pytest.raises(ValueError, match="calculate_kv_scales"):
        CacheConfig(calculate_kv_scales=True)
    assert CacheConfig(kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True).calculate_kv_scales


def test_gridllm_up_passes_calculate_kv_scales_to_its_workers():
    from gridllm.cli import build_parser, stack_config_from_args
    from gridllm.common.cli_args import to_argv

    config = stack_config_from_args(build_parser().parse_args(
        ["up", "--kv-cache-dtype", "fp8", "--calculate-kv-scales"]))
    assert "--calculate-kv-scales" in to_argv(config.cache_config)
    with pytest.raises(ValueError, match="calculate_kv_scales"):
        stack_config_from_args(build_parser().parse_args(["up", "--calculate-kv-scales"]))


def test_prompts_without_a_tokenizer_are_fixed_and_in_range():
    first = calibration_prompts(None, 320, 100)
    assert first == calibration_prompts(None, 320, 100)
    assert first and all(len(ids) == 100 and 0 <= min(ids) and max(ids) < 320 for ids in first)
    assert all(len(ids) == MAX_CALIBRATION_TOKENS for ids in calibration_prompts(None, 9, 10**6))


@pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                    reason="smollm2-135m is not in the cache (make test fetches it)")
def test_token_ids_past_the_models_vocabulary_are_dropped():
    """A tokenizer larger than the model's embedding table must not index past it."""
    from gridllm.common.tokenizer import load_tokenizer
    from worker_svc.loader import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    full = calibration_prompts(lambda: tokenizer, tokenizer.vocab_size, 1000)
    cut = calibration_prompts(lambda: tokenizer, 1000, 1000)
    assert len(cut) == len(full) and all(ids and max(ids) < 1000 for ids in cut)
    assert all(ids == [i for i in whole if i < 1000] for ids, whole in zip(cut, full, strict=True))


@pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                    reason="smollm2-135m is not in the cache (make test fetches it)")
def test_prompts_with_a_tokenizer_are_the_texts_and_a_chat():
    from gridllm.common.tokenizer import load_tokenizer
    from worker_svc.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tokenizer = load_tokenizer(path)
    prompts = calibration_prompts(lambda: tokenizer, tokenizer.vocab_size, 40)
    texts = [tokenizer(text).input_ids[:40] for text in CALIBRATION_TEXTS]
    assert prompts[:len(texts)] == texts
    chat = prompts[len(texts):]  # SmolLM2-Instruct has a chat template
    assert len(chat) == 1 and chat[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": CALIBRATION_TEXTS[0]}], add_generation_prompt=True,
        tokenize=True, return_dict=False)[:40]


@pytest.mark.parametrize("factor", [2.0 ** 12, 2.0 ** -12])
def test_calculated_scales_keep_keys_and_values_outside_e4m3s_range(tiny_model_dir, tmp_path,
                                                                   factor):
    """Keys and values 4096 times larger saturate an FP8 cache of scales 1.0 at +-448, and
    4096 times smaller fall under its smallest subnormal (2^-9): either ruins the
    outputs. With the scales computed at load the cache holds the same e4m3 values as for
    the unscaled model, so the logits are those of the unscaled model's FP8 cache."""
    from gridllm.bench.quant_accuracy import (
        Case,
        teacher_forced_logits,
        write_rescaled_kv_checkpoint,
    )

    model_dir = tiny_model_dir("llama")
    scaled_dir = write_rescaled_kv_checkpoint(model_dir, str(tmp_path / "scaled"), factor)
    generator = torch.Generator().manual_seed(0)
    cases = [Case(torch.randint(2, 320, (n + 12,), generator=generator), n, torch.empty(0),
                  torch.empty(0)) for n in (9, 23, 40)]

    def logits(model_path: str, kv_dtype: torch.dtype, calculate: bool) -> torch.Tensor:
        runner = (_runner(model_path, calculate_kv_scales=True) if calculate else
                  _runner(model_path))
        return torch.cat(teacher_forced_logits(runner.model, cases, kv_dtype, 12))

    fp8 = torch.float8_e4m3fn
    reference = logits(model_dir, torch.float32, False)
    torch.testing.assert_close(logits(scaled_dir, torch.float32, False), reference,
                               rtol=1e-5, atol=1e-5)  # the same function
    unscaled = logits(model_dir, fp8, True)
    calculated = logits(scaled_dir, fp8, True)
    torch.testing.assert_close(calculated, unscaled, rtol=1e-5, atol=1e-5)
    # Against an FP8 cache's usual error: the unscaled model's at scales of 1.0.
    usual = (logits(model_dir, fp8, False) - reference).abs().max()
    error = (calculated - reference).abs().max()
    ruined = (logits(scaled_dir, fp8, False) - reference).abs().max()
    print(f"factor {factor}: usual {usual:.4f} calculated {error:.4f} ruined {ruined:.4f}")
    assert error < 2 * usual and ruined > 5 * usual


def test_workers_report_where_their_kv_cache_scales_come_from(tiny_model_dir, tmp_path):
    """WorkerInfo.kv_cache_scales (a scheduler links only workers that agree): calculated,
    a checkpoint's, or empty for scales of 1.0 and for a cache in the model's dtype."""
    from tests.worker_svc.fp8_checkpoints import write_kv_scales_checkpoint
    from worker_svc.server import served_kv_cache_scales

    model_dir = tiny_model_dir("llama")
    checkpoint = write_kv_scales_checkpoint(model_dir, str(tmp_path / "model"),
                                            [(0.5, 0.25), (0.125, 2.0)])
    assert served_kv_cache_scales(_runner(model_dir, calculate_kv_scales=True)) == "calculated"
    assert served_kv_cache_scales(_runner(checkpoint)) == "checkpoint"
    assert served_kv_cache_scales(_runner(model_dir)) == ""
    plain = ModelRunner(ModelConfig(model=checkpoint, device="cpu"),
                        CacheConfig(num_kv_blocks=16), SchedulerConfig())
    assert served_kv_cache_scales(plain) == ""
