"""FP8 weights (Fp8Linear, quantize_weights) and the FP8 KV cache's sizing and settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gridllm import SamplingParams
from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig, engine_configs
from tests.worker_svc.step_driver import run_requests
from worker_svc.layers.quantization import (
    FP8_LINEAR_NAMES,
    WEIGHT_ONLY_MAX_ROWS,
    Fp8Linear,
    kv_cache_torch_dtype,
    quantize_weights,
)
from worker_svc.loader import load_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fake_quant_reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """The product Fp8Linear stands for, written out: per-channel e4m3 weights, per-token
    e4m3 activations, float32 accumulation."""
    def quant(t):
        scale = (t.abs().amax(-1, keepdim=True).float() * (1 / 448.0)).clamp(min=1e-12)
        return (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    out = quant(x) @ quant(linear.weight.detach()).t()
    return out + linear.bias.detach().float() if linear.bias is not None else out


def _weight_only_reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Unquantized activations times the e4m3 weight (per-channel scales)."""
    w = linear.weight.detach()
    scale = (w.abs().amax(-1, keepdim=True).float() * (1 / 448.0)).clamp(min=1e-12)
    w_q = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    out = x.float() @ w_q.t()
    return out + linear.bias.detach().float() if linear.bias is not None else out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch,seq", [(3, 5), (4, 10)])
def test_fp8_linear_is_the_quantized_product(bias, batch, seq):
    """Up to WEIGHT_ONLY_MAX_ROWS rows only W is quantized; beyond, activations too."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(batch, seq, 64)
    x[0, 0] = 0.0  # an all-zero token must not make NaN
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (48,)
    out = layer(x)
    assert out.shape == (batch, seq, 48) and not torch.isnan(out).any()
    is_weight_only = batch * seq <= WEIGHT_ONLY_MAX_ROWS
    reference = _weight_only_reference if is_weight_only else _fake_quant_reference
    torch.testing.assert_close(out, reference(x.view(-1, 64), linear).view(batch, seq, 48),
                               atol=1e-5, rtol=1e-5)
    # Quantization error: a few percent of the output's magnitude, not zero.
    exact = linear(x).detach()
    error = float((out - exact).abs().max() / exact.abs().max())
    assert 0 < error < 0.1


def test_quantize_weights_replaces_the_decoder_linears_only(tiny_model_dir):
    model, config = load_model(ModelConfig(model=tiny_model_dir("llama3"), device="cpu",
                                           quantization="fp8"))
    names = [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(names) == len(FP8_LINEAR_NAMES) * config.num_hidden_layers
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens,
                                                                nn.Embedding)
    assert model.lm_head.weight.dtype == torch.float32


def test_quantization_of_other_families_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization='fp8' supports the Llama family"):
        load_model(ModelConfig(model=tiny_model_dir("opt"), device="cpu", quantization="fp8"))


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(model="m", quantization="int3")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        engine_configs("m", kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="quantization"):
        quantize_weights(nn.Linear(4, 4), "int3")
    assert kv_cache_torch_dtype("auto", torch.bfloat16, torch.device("cpu"), "torch") \
        == torch.bfloat16
    for name in ("fp8", "fp8_e4m3", "fp8_e4m3fn"):
        assert kv_cache_torch_dtype(name, torch.bfloat16, torch.device("cpu"), "torch") \
            == torch.float8_e4m3fn
    assert kv_cache_torch_dtype("fp8_e5m2", torch.bfloat16, torch.device("cpu"), "torch") \
        == torch.float8_e5m2
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_torch_dtype("fp8_e3m4", torch.bfloat16, torch.device("cpu"), "torch")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv,cache_dtype", [("fp8", torch.float8_e4m3fn),
                                            ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache_doubles_blocks_per_byte(tiny_model_dir, dtype, kv, cache_dtype):
    """Blocks are sized from the cache's element size: 1 byte in FP8."""
    from worker_svc.model_runner import ModelRunner

    model_dir = tiny_model_dir("llama")
    runners = {name: ModelRunner(ModelConfig(model=model_dir, device="cpu", dtype=dtype),
                                 CacheConfig(kv_cache_memory=1 << 20, kv_cache_dtype=name),
                                 SchedulerConfig())
               for name in ("auto", kv)}
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert runners[kv].kv_caches[0][0].dtype == cache_dtype
    assert runners[kv].bytes_per_block() * element == runners["auto"].bytes_per_block()
    assert runners[kv].num_kv_blocks == element * runners["auto"].num_kv_blocks


def test_runner_generates_with_fp8_weights_and_kv_cache(tiny_model_dir):
    """Both settings together through the runner: the greedy tokens mostly match the
    unquantized model's (a random tiny model has small logit margins, so not all)."""
    from worker_svc.model_runner import ModelRunner

    model_dir = tiny_model_dir("llama")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[1, 5, 9, 12, 40], [7, 3, 3, 8]]
    outputs = {}
    for name, quantization, kv in (("exact", None, "auto"), ("fp8", "fp8", "fp8"),
                                   ("fp8_e5m2", "fp8", "fp8_e5m2")):
        runner = ModelRunner(ModelConfig(model=model_dir, device="cpu", quantization=quantization),
                             CacheConfig(num_kv_blocks=16, kv_cache_dtype=kv), SchedulerConfig())
        outputs[name], _ = run_requests(runner, prompts, params, 8)
    for name in ("fp8", "fp8_e5m2"):
        assert all(len(o) == 8 for o in outputs[name])
        same = sum(a == b for x, y in zip(outputs["exact"], outputs[name], strict=True)
                   for a, b in zip(x, y, strict=True))
        assert same >= 8, (name, outputs)


@pytest.mark.gpu
@needs_gpu
def test_scaled_mm_matches_fake_quantization():
    """On CUDA (8.9+, bf16) the GEMM is torch._scaled_mm; it computes the same quantized
    product as the CPU path up to bf16 output rounding."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability 8.9+")
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=True).cuda().to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = _fake_quant_reference(x, linear)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_rows", [1, 3, WEIGHT_ONLY_MAX_ROWS])
def test_weight_only_kernel_matches_fake_quantization(num_rows):
    """Decode-sized calls on CUDA (8.9+) go through the e4m3-weight Triton kernel; it
    computes the CPU path's weight-only product up to bf16 output rounding."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversions in Triton need compute capability 8.9+")
    torch.manual_seed(0)
    linear = nn.Linear(4096, 1536, bias=True).cuda().to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(num_rows, 4096, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    expected = _weight_only_reference(x, linear)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)


def test_gridllm_up_passes_the_fp8_flags_to_its_workers():
    from gridllm.cli import build_parser, stack_config_from_args
    from gridllm.common.cli_args import to_argv

    config = stack_config_from_args(build_parser().parse_args(
        ["up", "--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"]))
    assert "--quantization" in to_argv(config.model_config)
    assert to_argv(config.cache_config) == ["--kv-cache-dtype", "fp8_e4m3"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--quantization", "int3"])


def test_quantizing_at_load_streams_the_values_of_quantizing_the_loaded_model(tiny_model_dir):
    """quantization='fp8' quantizes each projection's weight as the checkpoint streams by
    (the projections are never built in the model's dtype); the e4m3 bytes and scales are
    those of quantizing the loaded float model layer by layer (``Fp8Linear.from_linear``)."""
    model_dir = tiny_model_dir("qwen2")  # merged q/k/v with biases
    streamed, _ = load_model(ModelConfig(model=model_dir, device="cpu", quantization="fp8"))
    loaded, _ = load_model(ModelConfig(model=model_dir, device="cpu"))
    quantize_weights(loaded, "fp8")
    pairs = [(a, b) for a, b in zip(streamed.modules(), loaded.modules(), strict=True)
             if isinstance(a, Fp8Linear)]
    assert len(pairs) == len(FP8_LINEAR_NAMES) * 2
    for a, b in pairs:
        assert isinstance(b, Fp8Linear)
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
        assert torch.equal(a.weight_scale, b.weight_scale)
        assert (a.bias is None) == (b.bias is None)
        assert a.bias is None or torch.equal(a.bias, b.bias)
