import re

import pytest
import torch

from kernels import torch_ref
from kernels.rms_norm import qk_rms_norm_, rms_norm
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    needs_gpu,
    poisoned_allocations,
)
from worker_svc.layers import ops
from worker_svc.layers.layers import RMSNorm


def _check(num_rows: int, hidden: int, dtype: torch.dtype, with_residual: bool,
           device: torch.device) -> None:
    x = torch.randn(num_rows, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn(num_rows, hidden, device=device).to(dtype) if with_residual else None
    with poisoned_allocations():
        out = rms_norm(x, weight, 1e-6, residual)
    expected = torch_ref.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert_close(out[0], expected[0], "normed", dtype)
        assert_close(out[1], expected[1], "residual", dtype)
    else:
        assert_close(out, expected, "normed", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(1, 16), (7, 100), (33, 64)])
def test_rms_norm_matches_reference(num_rows, hidden, dtype, with_residual):
    _check(num_rows, hidden, dtype, with_residual, DEVICE)


def test_rms_norm_keeps_leading_dims():
    x = torch.randn(2, 3, 24, device=DEVICE)
    weight = torch.randn(24, device=DEVICE)
    assert_close(rms_norm(x, weight, 1e-5), torch_ref.rms_norm(x, weight, 1e-5), "3d")


def test_rms_norm_rejects_bad_arguments():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(31, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.randn(32, device=DEVICE), 1e-6, residual=torch.randn(4, 31))
    with pytest.raises(ValueError, match="x"):
        rms_norm(torch.randn(32, 4, device=DEVICE).t(), torch.randn(32, device=DEVICE), 1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (513, 4096), (2048, 5120)])
def test_rms_norm_gpu(num_rows, hidden, dtype, with_residual):
    _check(num_rows, hidden, dtype, with_residual, torch.device("cuda"))


def _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, pad=0):
    """A q/k/v projection's output rows (``pad`` extra columns a row), as the attention
    layer splits it: ``(qkv, q, k, v)`` views ``[T, heads, head_dim]``."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    rows = torch.randn(num_tokens, q_size + 2 * kv_size + pad, device=device).to(dtype) * 3
    qkv = rows[:, :q_size + 2 * kv_size]
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (rows, q.view(num_tokens, num_heads, head_dim),
            k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim))


def _check_qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    rows, q, k, v = _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, pad=5)
    before = rows.clone()
    w_q = (1 + 0.3 * torch.randn(head_dim, device=device)).to(dtype)
    w_k = (1 - 0.3 * torch.randn(head_dim, device=device)).to(dtype)
    expected_q = torch_ref.rms_norm(q, w_q, 1e-6)
    expected_k = torch_ref.rms_norm(k, w_k, 1e-6)
    qk = q.as_strided((num_tokens, num_heads + num_kv_heads, head_dim), q.stride())
    assert qk_rms_norm_(qk, w_q, w_k, 1e-6, num_heads) is qk
    assert_close(q, expected_q, "q heads", dtype)
    assert_close(k, expected_k, "k heads", dtype)
    # v and the padding columns are not written.
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    assert torch.equal(rows[:, q_size + kv_size:], before[:, q_size + kv_size:])


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim",
                         [(1, 4, 2, 16), (7, 6, 2, 100), (3, 28, 12, 64), (5, 2, 2, 8)])
def test_qk_rms_norm_normalizes_each_head_in_place(num_tokens, num_heads, num_kv_heads,
                                                   head_dim, dtype):
    """Each query head with q's weight and each key head with k's, read and written through
    the projection's strides (rows wider than q and k; 40 heads of 64 take two programs a
    token), against the reference norm of each view; v is left as it was."""
    _check_qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype, DEVICE)


def test_qk_rms_norm_rejects_bad_arguments():
    qk = torch.randn(3, 6, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="^qk "):
        qk_rms_norm_(qk[0], w, w, 1e-6, 4)
    with pytest.raises(ValueError, match="^q_weight "):
        qk_rms_norm_(qk, torch.ones(15, device=DEVICE), w, 1e-6, 4)
    with pytest.raises(ValueError, match="^k_weight "):
        qk_rms_norm_(qk, w, w.half(), 1e-6, 4)
    with pytest.raises(ValueError, match="^num_q_heads "):
        qk_rms_norm_(qk, w, w, 1e-6, 7)
    with pytest.raises(ValueError, match="^qk "):
        qk_rms_norm_(qk.transpose(1, 2), w, w, 1e-6, 4)


def test_ops_qk_rms_norm_takes_the_projection_views(monkeypatch):
    """``ops.qk_rms_norm_`` as the attention layer calls it (here with the kernels on in
    Triton's interpreter): the query and key views of one projection normalize in place as
    the layer's two RMSNorms would; views of separate buffers, or weights of another dtype,
    are left to the caller's norms and not written."""
    monkeypatch.setattr(ops, "_triton", lambda x: True)
    _, q, k, v = _qkv(4, 8, 2, 32, torch.float32, DEVICE)
    q_norm, k_norm = RMSNorm(32, 1e-5).to(DEVICE), RMSNorm(32, 1e-5).to(DEVICE)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(-1.5, -0.5)
    monkeypatch.setattr(ops, "_triton", lambda x: False)
    expected_q, expected_k = q_norm(q), k_norm(k)
    monkeypatch.setattr(ops, "_triton", lambda x: True)
    v_before = v.clone()
    assert ops.qk_rms_norm_(q, k, q_norm.weight, k_norm.weight, 1e-5)
    assert_close(q, expected_q, "q", torch.float32)
    assert_close(k, expected_k, "k", torch.float32)
    assert torch.equal(v, v_before)
    apart = k.clone()
    q_before = q.clone()
    assert not ops.qk_rms_norm_(q, apart, q_norm.weight, k_norm.weight, 1e-5)
    assert not ops.qk_rms_norm_(q, k, q_norm.weight.half(), k_norm.weight, 1e-5)
    assert torch.equal(q, q_before) and torch.equal(apart, k)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim",
                         [(1, 16, 8, 128), (64, 16, 8, 128), (513, 64, 8, 128), (37, 40, 8, 128)])
def test_qk_rms_norm_gpu(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    _check_qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype, torch.device("cuda"))


@pytest.mark.sm90
def test_qk_rms_norm_compiles_for_sm90_to_vector_loads_and_stores():
    """Without a GPU: the served variant (bf16, 16 heads of 128 a program, dependent
    launch) compiles for sm_90 (ptxas runs) and moves the heads' 4 KB in 16-byte vectors
    (the projection's strides are 16-divisible): two loads and two stores a thread of its
    128; the weights' two elements a thread are the only scalar loads."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    ptx = compile_triton_for_sm90(
        "kernels.rms_norm", "_qk_rms_norm_kernel",
        dict(x_ptr="*bf16", q_w_ptr="*bf16", k_w_ptr="*bf16", eps="fp32"),
        dict(BLOCK_H=16, BLOCK_D=128, USE_GDC=True),
        aligned=("stride_t", "stride_h", "head_dim"), options={"num_warps": 4})
    accesses = re.findall(r"(ld|st)\.global(\.[\w.]+)", ptx)
    assert sorted(accesses) == sorted([("ld", ".v4.b32")] * 2 + [("ld", ".b16")] * 2
                                      + [("st", ".v4.b32")] * 2), accesses
    assert "griddepcontrol.wait" in ptx
