"""Token bitmask (structured outputs): set to -inf every logit whose bit is 0.

``bitmask[r]`` packs one row's allowed tokens 32 to an int32 word (bit ``t % 32`` of word
``t // 32``: xgrammar's layout); it applies to ``logits[rows[r]]``, so only the constrained
rows of a batch are read and written. In place, no host sync (CUDA-graph friendly).

On the CPU, ``apply_token_bitmask_cpu`` runs xgrammar's C++ loop instead: about four times
faster than the torch reference (``torch_ref.apply_token_bitmask``, the test oracle) on one
core, which matters next to a CPU forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

# Tokens per program: 32 words of the bitmask.
_BLOCK = 1024


@triton.jit
def _token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_logits, stride_bitmask,
                          vocab, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + r).to(tl.int64)
    tokens = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    words = tl.load(bitmask_ptr + r * stride_bitmask + tokens // 32, mask=in_vocab, other=-1)
    is_allowed = ((words >> (tokens % 32).to(tl.int32)) & 1) != 0
    # Only forbidden logits are written: the allowed ones keep their exact values.
    tl.store(logits_ptr + row * stride_logits + tokens,
             tl.full((BLOCK,), float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty),
             mask=in_vocab & ~is_allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor) -> None:
    """Drop-in for ``torch_ref.apply_token_bitmask`` (in place).

    Args:
        logits: ``[B, V]``, contiguous in the last dim.
        bitmask: ``[R, ceil(V / 32)]`` int32 (or wider), one row per constrained row.
        rows: ``[R]`` the logits row of each bitmask row (distinct).
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("bitmask", bitmask, ndim=2, dtypes=(torch.int32,), device=logits.device,
                 last_dim_contiguous=True)
    check_tensor("rows", rows, ndim=1, dtypes=INDEX_DTYPES, device=logits.device)
    vocab = logits.shape[1]
    _check_bitmask_shape(bitmask, rows, vocab)
    if rows.shape[0] == 0 or vocab == 0:
        return
    grid = (rows.shape[0], triton.cdiv(vocab, _BLOCK))
    _token_bitmask_kernel[grid](logits, bitmask, rows, logits.stride(0), bitmask.stride(0),
                                vocab, BLOCK=_BLOCK, num_warps=4)


def _check_bitmask_shape(bitmask: torch.Tensor, rows: torch.Tensor, vocab: int) -> None:
    if bitmask.shape[0] != rows.shape[0] or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask must have shape ({rows.shape[0]}, >= {-(-vocab // 32)}), "
                         f"got {tuple(bitmask.shape)}.")


def apply_token_bitmask_cpu(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor) -> None:
    """``apply_token_bitmask`` on CPU tensors (float32 logits), by xgrammar's C++ loop."""
    import xgrammar as xgr

    check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,), contiguous=True)
    check_tensor("bitmask", bitmask, ndim=2, dtypes=(torch.int32,), device=logits.device,
                 contiguous=True)
    check_tensor("rows", rows, ndim=1, dtypes=INDEX_DTYPES, device=logits.device)
    vocab = logits.shape[1]
    _check_bitmask_shape(bitmask, rows, vocab)
    if rows.shape[0] == 0 or vocab == 0:
        return
    # xgrammar reads bitmask row i for logits row i: spread the rows out when they differ.
    index = rows.tolist()
    if index != list(range(len(index))):
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        bitmask = full
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=index,
                                    backend="cpu")
