"""Argument checks shared by the prefill attention kernels (``prefill_attention`` and the
Gluon kernel of ``gluon_prefill_attention``, which ``prefill_attention`` dispatches to)."""

from __future__ import annotations

import torch

from kernels._utils import INDEX_DTYPES, check_tensor
from kernels.paged_decode_attention import _check_paged_args


def check_prefill_args(query: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """ValueError or TypeError naming the argument unless the batch is one
    ``prefill_attention`` takes (arguments as there)."""
    _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale)
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES,
                 device=query.device, contiguous=True)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc must have {seq_lens.shape[0] + 1} entries, "
                         f"got {query_start_loc.shape[0]}.")


def longest_query(query: torch.Tensor, query_start_loc: torch.Tensor,
                  max_query_len: int | None) -> int:
    """The longest query chunk, 0 when there is nothing to attend: ``max_query_len``, else
    read from ``query_start_loc`` (a device sync)."""
    if query_start_loc.shape[0] <= 1 or query.shape[0] == 0:
        return 0
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    return max(max_query_len, 0)
