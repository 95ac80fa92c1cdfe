"""The tensor-core e4m3 GEMV (``kernels.fp8_mma_gemv``): against a float64 reference on the
GPU (exact e4m3 -> bfloat16 conversion, subnormals included, and x's scaling at the ends of
bfloat16's range), what it declines, and its sm_90 loop compiled on any machine."""

import re

import pytest
import torch

from kernels import fp8_mma_gemv as mma_gemv
from kernels.fp8 import FP8_DTYPE
from tests.kernels.conftest import DEVICE, assert_close, needs_gpu, poisoned_allocations
from tests.kernels.sm90_ptx import compile_for_sm90, loop_body


def _quantized(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=device) * 0.02
    scale = (w.abs().amax(-1) / 448).clamp_min(1e-12)
    return (w / scale[:, None]).to(FP8_DTYPE), scale


def _reference(x, weight, scale, bias=None, silu_out=False):
    y = x.double() @ (weight.double() * scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    if silu_out:  # rounded as kernels/silu_and_mul.py: each half, then silu, to bf16
        half = y.shape[1] // 2
        gate = y[:, :half].to(torch.bfloat16).float()
        up = y[:, half:].to(torch.bfloat16).float()
        y = (gate * torch.sigmoid(gate)).to(torch.bfloat16).float() * up
    return y.to(torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("use_gdc", [False, True])
@pytest.mark.parametrize("config", [None, (32, 4, 4), (64, 2, 1), (64, 3, 8)])
@pytest.mark.parametrize("n,k,rows,bias,silu_out", [
    (6144, 4096, 2, False, False), (4096, 14336, 8, False, False),
    (28672, 4096, 3, False, True), (1000, 4112, 5, True, False), (200, 4112, 8, True, True),
    (4096, 4096, 1, False, False)])
def test_matches_reference(n, k, rows, bias, silu_out, config, use_gdc):
    """Llama-3-8B's shapes and ragged ones (a channel tile and a K tile cut short), 1-8 rows,
    bias, SiLU-and-mul, with and without split K; x holds 3e4, -2e4, 1e-30 and zeros."""
    torch.manual_seed(0)
    weight, scale = _quantized(n, k, DEVICE)
    x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
    x[0, :5] = torch.tensor([3e4, -2e4, 1e-30, 0.0, 5e-8])
    b = torch.randn(n, device=DEVICE).to(torch.bfloat16) if bias else None
    assert mma_gemv.serves(x, weight, scale)
    with poisoned_allocations():
        y = mma_gemv.fp8_mma_gemv(x, weight, scale, b, silu_out=silu_out, config=config,
                                  use_gdc=use_gdc)
    expected = _reference(x, weight, scale, b, silu_out)
    assert_close(y, expected, "e4m3 tensor-core GEMV", torch.bfloat16,
                 scale=float(expected.float().abs().max()) / 4)


@pytest.mark.gpu
@needs_gpu
def test_subnormal_and_extreme_weights_convert_exactly():
    """Every e4m3 value (subnormals, zeros, +-448) times a one-hot x gives that value back:
    the integer conversion is exact and the tensor cores keep bfloat16 subnormals."""
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    values = codes.view(FP8_DTYPE)
    finite = ~torch.isnan(values.float())
    weight = values[finite].reshape(-1, 1).repeat(1, 16).contiguous()  # [254, 16]
    scale = torch.ones(weight.shape[0], device=DEVICE)
    x = torch.zeros(1, 16, device=DEVICE, dtype=torch.bfloat16)
    x[0, 3] = 1.0
    y = mma_gemv.fp8_mma_gemv(x, weight, scale)
    torch.testing.assert_close(y[0].float(), weight[:, 0].float().to(torch.bfloat16).float(),
                               atol=0, rtol=0)


def test_declines_what_it_does_not_run():
    """Off CUDA 9.0+, float16 or 9+ rows, a float16 weight, no scales, K not a multiple of 16:
    the callers keep their other kernels."""
    weight, scale = _quantized(64, 256, DEVICE)
    x = torch.randn(2, 256, device=DEVICE).to(torch.bfloat16)
    on_gpu = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) >= (9, 0)
    assert mma_gemv.serves(x, weight, scale) == (on_gpu and mma_gemv.gluon is not None)
    assert not mma_gemv.serves(x.half(), weight, scale)
    assert not mma_gemv.serves(torch.randn(9, 256, device=DEVICE).to(torch.bfloat16), weight,
                               scale)
    assert not mma_gemv.serves(x, weight.to(torch.float16), scale)
    assert not mma_gemv.serves(x, weight, None)
    assert not mma_gemv.serves(x[:, :250], weight[:, :250], scale)


def test_bad_arguments_are_named():
    weight, scale = _quantized(64, 256, DEVICE)
    x = torch.randn(2, 256, device=DEVICE).to(torch.bfloat16)
    cases = [
        (dict(x=x.float()), "x must have dtype"),
        (dict(weight=weight.float()), "weight must have dtype"),
        (dict(weight=weight[:, :128]), "weight must have shape"),
        (dict(weight_scale=scale[:10]), "weight_scale must have shape"),
        (dict(weight_scale=scale.double()), "weight_scale must have dtype"),
        (dict(bias=torch.zeros(3, device=DEVICE)), "bias must have shape"),
        (dict(x=torch.randn(9, 256, device=DEVICE).to(torch.bfloat16)), "1 to 8 rows"),
        (dict(weight=weight[:63], weight_scale=scale[:63], silu_out=True), "even number"),
    ]
    for change, message in cases:
        args = dict(x=x, weight=weight, weight_scale=scale) | change
        with pytest.raises(ValueError, match=message):
            mma_gemv.fp8_mma_gemv(**args)
    if not mma_gemv.serves(x, weight, scale):  # CPU, or a GPU the kernel does not take
        with pytest.raises(ValueError, match="needs a CUDA GPU of compute capability 9.0"):
            mma_gemv.fp8_mma_gemv(x, weight, scale)


def _sm90_ptx(block_n: int, stages: int) -> str:
    """The kernel's sm_90 PTX (no bias or SiLU, one split, dependent launch on)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    return compile_for_sm90(
        "kernels.fp8_mma_gemv", "_fp8_mma_gemv_kernel", block_n,
        dict(x_ptr="*bf16", w_ptr="*u8", scale_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16",
             partial_ptr="*fp32", lock_ptr="*i32"),
        dict(HAS_BIAS=False, SILU_OUT=False, SPLIT_K=1, BLOCK_N=block_n, STAGES=stages,
             USE_GDC=True), aligned=("num_in", "num_out", "k_per_split"))


@pytest.mark.sm90
@pytest.mark.skipif(mma_gemv.gluon is None, reason="Triton without Gluon")
@pytest.mark.parametrize("block_n", [32, 64])
def test_weight_tiles_reach_the_mma_from_registers(block_n):
    """Compiled for sm_90: the loop reads each tile back from shared memory once as 16-byte
    vectors and stores nothing there, converts e4m3 with 3 integer instructions per byte
    pair, and issues ``block_n / 16 x 8`` MMAs per 128 of K."""
    body = loop_body(_sm90_ptx(block_n, stages=3))
    assert "st.shared" not in body and "ldmatrix" not in body
    loads = re.findall(r"ld\.shared[\w.]*", body)
    # block_n x 128 bytes of W and 8 x 128 bfloat16 of x, 16 bytes a thread and load.
    assert loads and all(".v4" in load for load in loads)
    assert len(loads) == (block_n * 128 + 8 * 128 * 2) // 16 // 32
    assert len(re.findall(r"mma\.sync\S*\.bf16\.bf16", body)) == block_n // 16 * 8
    pairs = block_n * 128 // 2 // 32
    assert len(re.findall(r"prmt\.b32", body)) == pairs


@pytest.mark.sm90
@pytest.mark.skipif(mma_gemv.gluon is None, reason="Triton without Gluon")
@pytest.mark.parametrize("stages", [2, 3])
def test_weight_is_requested_before_the_dependent_launch_wait(stages):
    """Compiled for sm_90 with programmatic dependent launch: the weight's first ``stages -
    1`` tiles (no kernel writes them) are copied before ``griddepcontrol.wait``, x's tiles
    (the previous kernel's output) only after it."""
    block_n = 64
    ptx = _sm90_ptx(block_n, stages)
    before, wait, after = ptx.partition("griddepcontrol.wait")
    assert wait and "griddepcontrol.wait" not in after
    copies_before = len(re.findall(r"cp\.async\.cg\.shared\.global", before))
    # block_n x 128 bytes of W a tile, 16 bytes a copy, over the warp's 32 lanes.
    assert copies_before == (stages - 1) * block_n * 128 // 16 // 32
    # x's first tiles (8 rows x 128 bfloat16) follow the wait, before the loop.
    x_copies = (stages - 1) * 8 * 128 * 2 // 16 // 32
    assert len(re.findall(r"cp\.async\.cg\.shared\.global", after)) >= x_copies
