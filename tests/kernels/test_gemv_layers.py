"""The model layers' GEMV paths (worker_svc.layers.ops), run through Triton's interpreter on
the CPU by letting ``ops`` take CPU tensors for CUDA ones: one decode row goes through the
GEMV, with SiLU-and-mul fused after the gate/up projection and the residual add and RMSNorm
before a 16-bit projection, and gives the unfused layers' values; more rows, or the kernel
switched off, take the unfused path. FP8 layers at rows they quantize per token take their
e4m3 rows from the RMSNorm and SiLU-and-mul kernels, and give the unfused values bit for
bit."""

import pytest
import torch
import torch.nn.functional as F

from kernels import torch_ref
from worker_svc.layers import ops, quantization
from worker_svc.layers.layers import RMSNorm
from worker_svc.layers.quantization import WEIGHT_ONLY_MAX_ROWS, Fp8Linear
from worker_svc.parallel.layers import ColumnParallelLinear, RowParallelLinear


@pytest.fixture
def on_kernels(monkeypatch):
    """``ops`` treats CPU tensors as CUDA ones (the kernels run in the interpreter)."""
    monkeypatch.setattr(ops, "_triton", lambda x: True)
    monkeypatch.setattr(ops, "GEMV_MAX_ROWS", 1)
    calls = []
    import kernels.gemv

    real = kernels.gemv._launch

    def counting(*args):
        calls.append(args[5:7])  # (norm, silu_out)
        return real(*args)

    monkeypatch.setattr(kernels.gemv, "_launch", counting)
    return calls


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_takes_the_gemv_for_one_row_only(on_kernels):
    torch.manual_seed(0)
    layer = ColumnParallelLinear.merged(96, [40, 40], bias=True)
    one, three = torch.randn(1, 96), torch.randn(3, 96)
    _close(layer(one), F.linear(one, layer.weight, layer.bias))
    assert len(on_kernels) == 1
    _close(layer(three), F.linear(three, layer.weight, layer.bias))
    assert len(on_kernels) == 1  # three rows: cuBLAS's path (F.linear)


def test_gate_up_projection_fuses_silu_and_mul(on_kernels):
    torch.manual_seed(1)
    gate_up = ColumnParallelLinear.merged(48, [64, 64], bias=True)
    x = torch.randn(1, 48)
    want = torch_ref.silu_and_mul(F.linear(x, gate_up.weight, gate_up.bias))
    _close(gate_up.forward_silu_and_mul(x), want)
    assert on_kernels == [(None, True)]
    two = torch.randn(2, 48)
    _close(gate_up.forward_silu_and_mul(two),
           torch_ref.silu_and_mul(F.linear(two, gate_up.weight, gate_up.bias)))
    assert len(on_kernels) == 1  # two rows: the linear layer, then silu_and_mul


def test_add_rms_norm_linear_fuses_the_norm(on_kernels):
    torch.manual_seed(2)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    qkv = ColumnParallelLinear.merged(64, [32, 16, 16], bias=True)
    x, residual = torch.randn(1, 64), torch.randn(1, 64)
    fused = ops.add_rms_norm_linear(x, residual, norm, qkv)
    assert fused is not None and len(on_kernels) == 1 and on_kernels[0][0] is not None
    normed, summed = torch_ref.rms_norm(x, norm.weight, norm.eps, residual)
    _close(fused[0], F.linear(normed, qkv.weight, qkv.bias))
    assert torch.equal(fused[1], summed)
    # The gate/up projection: the norm before it and SiLU-and-mul after it, one launch.
    gate_up = ColumnParallelLinear.merged(64, [24, 24], bias=False)
    act, summed_too = ops.add_rms_norm_linear(x, residual, norm, gate_up, silu_out=True)
    assert len(on_kernels) == 2 and on_kernels[1][0] is not None and on_kernels[1][1]
    _close(act, torch_ref.silu_and_mul(F.linear(normed, gate_up.weight)))
    assert torch.equal(summed_too, summed)
    # Two rows, or a layer that reduces across ranks: the caller's unfused path.
    assert ops.add_rms_norm_linear(torch.randn(2, 64), torch.randn(2, 64), norm, qkv) is None


def test_fp8_layers_fuse_on_gpus_that_convert_e4m3_only(on_kernels):
    torch.manual_seed(3)
    layer = Fp8Linear.from_linear(ColumnParallelLinear.merged(64, [32, 32], bias=False))
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(1, 64)
    # e4m3 weights never take the fused norm (the norm kernel, then the unfused GEMV).
    assert ops.add_rms_norm_linear(x, x.clone(), norm, layer) is None
    # The CPU has no e4m3 conversions in kernels: the layers keep their own path.
    assert not layer.is_fp8_native
    _close(layer.forward_silu_and_mul(x), torch_ref.silu_and_mul(layer(x)))
    assert on_kernels == []


def test_fp8_gate_up_fuses_silu_and_mul_where_e4m3_converts(on_kernels, monkeypatch):
    """With the GPU's e4m3 path (here the interpreter's word kernel), one bfloat16 row: the
    gate/up GEMV with SiLU-and-mul in its epilogue, the unfused layer's values."""
    torch.manual_seed(4)
    layer = Fp8Linear.from_linear(ColumnParallelLinear.merged(64, [32, 32], bias=False))
    monkeypatch.setattr(layer, "is_fp8_native", True)
    x = torch.randn(1, 64).to(torch.bfloat16)
    got = layer.forward_silu_and_mul(x)
    assert on_kernels == [(None, True)] and got.shape == (1, 32)
    assert torch.equal(got, ops.silu_and_mul(layer(x)))


def test_switched_off_runs_the_unfused_layers(on_kernels, monkeypatch):
    monkeypatch.setattr(ops, "GEMV_MAX_ROWS", 0)
    norm = RMSNorm(64, 1e-5)
    qkv = ColumnParallelLinear.merged(64, [32], bias=False)
    x = torch.randn(1, 64)
    assert ops.add_rms_norm_linear(x, x.clone(), norm, qkv) is None
    _close(qkv(x), F.linear(x, qkv.weight))
    assert on_kernels == []
    with pytest.raises(ValueError, match="rows must be in"):
        ops.set_gemv_max_rows(5)


def test_decoder_with_fused_decode_layers_generates_the_same_tokens(tiny_model_dir, on_kernels):
    """A whole model, one request (every decode step one row): the layers' GEMV paths with
    the norms and SiLU fused give the greedy tokens of the unfused run."""
    from gridllm import LLM, SamplingParams

    model_dir = tiny_model_dir("qwen3")  # Llama's layers, with q/k norms
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = [{"prompt_token_ids": [5, 17, 33, 2]}]

    llm = LLM(model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=16,
              max_num_seqs=2)

    def run():
        return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    fused = run()
    assert any(norm is not None for norm, _ in on_kernels)  # add-and-norm fused
    assert any(silu_out for _, silu_out in on_kernels)  # SiLU fused
    ops.set_gemv_max_rows(0)
    on_kernels.clear()
    assert run() == fused and on_kernels == []


@pytest.fixture
def quantizer_calls(monkeypatch):
    """Counts of the FP8 layers' quantization launches: on its own, or fused in the RMSNorm
    or the SiLU-and-mul kernel."""
    calls = {"alone": 0, "norm": 0, "silu": 0}
    for name, key in (("per_token_quant_fp8", "alone"), ("rms_norm_quant_fp8", "norm"),
                      ("silu_and_mul_quant_fp8", "silu")):
        real = getattr(quantization, name)

        def counting(*args, real=real, key=key):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(quantization, name, counting)
    return calls


def _native(layer: Fp8Linear) -> Fp8Linear:
    """The GPU's path (e4m3 conversions in kernels), here through the interpreter."""
    layer.is_fp8_native = True
    return layer


def test_fp8_layers_take_their_rows_quantized_by_the_norm_and_activation(on_kernels,
                                                                          quantizer_calls):
    torch.manual_seed(5)
    gate_up = _native(Fp8Linear.from_linear(ColumnParallelLinear.merged(64, [32, 32], True)))
    down = _native(Fp8Linear.from_linear(RowParallelLinear(32, 64, bias=False)))
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    rows = WEIGHT_ONLY_MAX_ROWS + 4
    x, residual = torch.randn(rows, 64), torch.randn(rows, 64)
    got, summed = ops.add_rms_norm_linear(x, residual, norm, gate_up)
    assert quantizer_calls == {"alone": 0, "norm": 1, "silu": 0}
    normed, want_summed = ops.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(got, gate_up(normed)) and torch.equal(summed, want_summed)
    assert torch.equal(down.forward_silu_and_mul_input(got), down(ops.silu_and_mul(got)))
    assert quantizer_calls == {"alone": 2, "norm": 1, "silu": 1}
    # Rows the layers do not quantize (weight-only), or the torch references switched on:
    # the layers' own paths.
    few = slice(0, WEIGHT_ONLY_MAX_ROWS)
    assert ops.add_rms_norm_linear(x[few], residual[few], norm, gate_up) is None
    _close(down.forward_silu_and_mul_input(got[few]), down(ops.silu_and_mul(got[few])))
    assert quantizer_calls == {"alone": 2, "norm": 1, "silu": 1}


def test_fp8_decoder_with_quantizing_kernels_generates_the_same_tokens(
        tiny_model_dir, on_kernels, quantizer_calls, monkeypatch):
    """A whole FP8 model on the GPU's path (interpreter): a prompt longer than the weight-only
    rows quantized by the norm and SiLU-and-mul kernels gives the greedy tokens of the run
    that quantizes in the layers."""
    from gridllm import SamplingParams
    from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
    from tests.worker_svc.step_driver import run_requests
    from worker_svc.model_runner import ModelRunner
    from worker_svc.models.llama import LlamaMLP

    model_dir = tiny_model_dir("llama")
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    prompt = [[(7 * i + 3) % 50 + 1 for i in range(WEIGHT_ONLY_MAX_ROWS + 3)]]

    def run():
        runner = ModelRunner(ModelConfig(model=model_dir, device="cpu", quantization="fp8"),
                             CacheConfig(num_kv_blocks=16), SchedulerConfig())
        for module in runner.model.modules():
            if isinstance(module, Fp8Linear):
                _native(module)
        return run_requests(runner, prompt, params, 2)[0]

    fused = run()
    assert quantizer_calls["norm"] > 0 and quantizer_calls["silu"] > 0
    monkeypatch.setattr(Fp8Linear, "forward_rms_norm", lambda *args, **kwargs: None)
    monkeypatch.setattr(LlamaMLP, "silu_in_down", lambda self, x: False)
    calls_before = dict(quantizer_calls)
    unfused = run()
    assert quantizer_calls["alone"] > calls_before["alone"]
    assert quantizer_calls["norm"] == calls_before["norm"]
    assert unfused == fused
