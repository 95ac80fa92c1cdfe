"""What the prefill attention kernels share (``prefill_attention`` and the Gluon kernel of
``gluon_prefill_attention``, which ``prefill_attention`` dispatches to): argument checks
and the list of a batch's query tiles their grids take."""

from __future__ import annotations

import torch
import triton

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


def query_tiles(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
                max_query_len: int, block_m: int, longest_first: bool = False,
                skip_one_token: bool = False) -> torch.Tensor:
    """The batch's query tiles of ``block_m`` queries as the prefill kernels launch them, a
    program per tile and head: ``[slots, 4]`` int32 rows of (request, first query row, its
    position, the request's sequence length), request by request, each request's latest
    (longest) tile first; rows past the last tile are -1. Device ops only (no sync):
    ``slots`` is a bound known on the host, ``ceil(num_tokens / block_m) + B`` or
    ``B * ceil(max_query_len / block_m)`` whichever is less, so a batch of one long chunk
    and many short ones launches about as many programs as it has tiles (a grid of every
    request times the longest chunk's tiles would launch mostly empty ones). A step's
    layers can share the rows (``cached_query_tiles``). With ``longest_first`` the tiles
    are ordered by the keys they visit, most first, over the whole batch (the Gluon
    kernel's persistent launch). With ``skip_one_token`` requests of one query get no
    tile (the decode kernel takes them: ``prefill_attention``'s ``split_one_token``)."""
    num_reqs = seq_lens.shape[0]
    slots = min(triton.cdiv(num_tokens, block_m) + num_reqs,
                num_reqs * triton.cdiv(max_query_len, block_m))
    qsl = query_start_loc.to(torch.int64)
    num_q = qsl[1:] - qsl[:-1]
    tiles = (num_q + block_m - 1) // block_m
    if skip_one_token:
        tiles = tiles.masked_fill(num_q == 1, 0)
    ends = tiles.cumsum(0)
    slot = torch.arange(slots, device=qsl.device)
    req = torch.searchsorted(ends, slot, right=True).clamp_(max=num_reqs - 1)
    m0 = (ends[req] - 1 - slot) * block_m
    seq = seq_lens.to(torch.int64)[req]
    rows = torch.stack((req, qsl[req] + m0, seq - num_q[req] + m0, seq), dim=1)
    empty = slot >= ends[-1]
    rows.masked_fill_(empty[:, None], -1)
    if longest_first:
        keys = torch.minimum(rows[:, 2] + block_m, rows[:, 3]).masked_fill_(empty, -1)
        rows = rows[torch.argsort(keys, descending=True, stable=True)]
    return rows.to(torch.int32)


def cached_query_tiles(batch_cache: dict | None, query_start_loc: torch.Tensor,
                       seq_lens: torch.Tensor, num_tokens: int, max_query_len: int,
                       block_m: int, skip_one_token: bool = False,
                       longest_first: bool = False) -> torch.Tensor:
    """``query_tiles``, kept in ``batch_cache`` (a dict that lives as long as the batch
    layout: a step's layers share it) when one is given."""
    key = ("query_tiles", block_m, skip_one_token, longest_first)
    tiles = None if batch_cache is None else batch_cache.get(key)
    if tiles is None:
        tiles = query_tiles(query_start_loc, seq_lens, num_tokens, max_query_len, block_m,
                            longest_first=longest_first, skip_one_token=skip_one_token)
        if batch_cache is not None:
            batch_cache[key] = tiles
    return tiles
