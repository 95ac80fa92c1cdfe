"""The model layers' GEMV paths (worker_svc.layers.ops), run through Triton's interpreter on
the CPU by letting ``ops`` take CPU tensors for CUDA ones: one decode row goes through the
GEMV, with SiLU-and-mul fused after the gate/up projection and the residual add and RMSNorm
before a 16-bit projection, and gives the unfused layers' values; more rows, or the kernel
switched off, take the unfused path."""

import pytest
import torch
import torch.nn.functional as F

from kernels import torch_ref
from worker_svc.layers import ops
from worker_svc.layers.layers import RMSNorm
from worker_svc.layers.quantization import Fp8Linear
from worker_svc.parallel.layers import ColumnParallelLinear


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
