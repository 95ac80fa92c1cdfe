"""The prefix-block hash: one chained hash per full KV block, stable across processes.

A block's hash covers its parent's hash, its token ids and an extra key (a cache salt), so
one hash names a whole prefix. The scheduler's block manager keys its prefix cache on it, the
Redis mirror publishes it, and routers test prefix overlap with it: all through this module.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Parent hash of a sequence's first block.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_key: str | None) -> int:
    """A 64-bit hash of one full block (blake2b, so equal in every process)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids))
    if extra_key:
        h.update(extra_key.encode())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, extra_key: str | None = None,
                 num_blocks: int | None = None, prefix: Sequence[int] = ()) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``.

    Args:
        token_ids: the sequence.
        block_size: tokens per block.
        extra_key: mixed into every hash (a cache salt).
        num_blocks: hash at most this many blocks (default: every full block).
        prefix: hashes of the leading blocks already known; hashing continues after them.
    Returns:
        ``prefix`` extended to ``min(num_blocks, len(token_ids) // block_size)`` hashes.
    """
    num_full = len(token_ids) // block_size
    if num_blocks is not None:
        num_full = min(num_full, num_blocks)
    hashes = list(prefix[:num_full])
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra_key)
        hashes.append(parent)
    return hashes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int,
                           extra_key: str | None = None,
                           max_blocks: int | None = None) -> list[int]:
    """Hashes of the prompt blocks a prefix-cache hit can cover.

    The scheduler always leaves the last token to compute (its step yields the logits), so a
    block ending at the last token is never reused.
    """
    return block_hashes(token_ids[:max(len(token_ids) - 1, 0)], block_size, extra_key,
                        max_blocks)
