"""Paged KV blocks: reference counts, an LRU free queue and automatic prefix caching.

A full block is identified by a chained hash of (parent block hash, its token ids, an
extra key), so a hash names a whole prefix. Freed blocks keep their hash and stay
reusable until evicted; the free queue hands out first what is least worth keeping.

When every attention layer sees only a window of the latest ``kv_window`` tokens, a
request's leading blocks that no query of its coming steps can see are given back as it
advances, so a long request holds about ``kv_window / block_size`` blocks. Their ids stay in
the request's table, positionally (the runner's kernels start at the window and never read
them; the worker's steps run in order, so a block reused by another request in this step is
written after every earlier step's reads).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gridllm.common.prefix_hash import ROOT_HASH, block_hashes
from scheduler_svc.request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered in the prefix cache.
    block_hash: int | None = None
    # The block's tokens, checked on every prefix hit (guards against hash collisions).
    token_ids: tuple[int, ...] | None = None
    # Hash of the block before it in its sequence (ROOT_HASH for a first block; None when
    # unknown, e.g. restored from a mirror that did not record it). Read by KV events.
    parent_hash: int | None = None


class BlockManager:
    """Owns the KV block pool of one worker.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks across requests by content hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 kv_window: int | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if kv_window is not None and kv_window < 1:
            raise ValueError(f"kv_window must be positive, got {kv_window}.")
        self.kv_window = kv_window
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, first out first: unhashed ones, then cached ones by LRU.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[int, KVBlock] = {}
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self._req_to_hashes: dict[str, list[int]] = {}
        # req_id -> leading blocks of its table already registered in the prefix cache.
        self._num_registered: dict[str, int] = {}
        # req_id -> leading blocks of its table given back (outside the window).
        self._num_released: dict[str, int] = {}
        # Prefix-cache counters, in tokens (as vLLM counts them).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Hashes stored/evicted since the last drain (read by the Redis mirror).
        self.stored_hashes: list[int] = []
        self.removed_hashes: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, [])]

    def num_held_blocks(self, req_id: str) -> int:
        """Blocks the request holds now (its table less those given back)."""
        return len(self.req_to_blocks.get(req_id, ())) - self._num_released.get(req_id, 0)

    def _release_outside_window(self, request: Request, req_blocks: list[KVBlock]) -> None:
        # The coming step's first query is at num_computed_tokens; it sees keys after
        # num_computed_tokens - kv_window, and later queries see less.
        num_dead = (request.num_computed_tokens - self.kv_window + 1) // self.block_size
        num_released = self._num_released.get(request.req_id, 0)
        if num_dead <= num_released:
            return
        num_dead = min(num_dead, len(req_blocks))
        self._num_released[request.req_id] = num_dead
        for block in req_blocks[num_released:num_dead]:
            self._unref(block)

    def _block_hashes(self, request: Request, num_tokens: int) -> list[int]:
        """Hashes of the request's full blocks within its first ``num_tokens`` tokens."""
        hashes = self._req_to_hashes.get(request.req_id, [])
        num_full = num_tokens // self.block_size
        if len(hashes) < num_full:
            hashes = block_hashes(request.all_token_ids, self.block_size, request.cache_salt,
                                  num_full, prefix=hashes)
            self._req_to_hashes[request.req_id] = hashes
        return hashes[:num_full]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, in full blocks.

        At least one token is always left to compute, so the step yields logits.
        Returns:
            The cached blocks and the number of tokens they hold.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_tokens = request.num_tokens - 1
        tokens = request.all_token_ids
        hits: list[KVBlock] = []
        for i, block_hash in enumerate(self._block_hashes(request, max_tokens)):
            block = self.cached_blocks.get(block_hash)
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            if block is None or block.token_ids != chunk:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Give the request room for ``num_new_tokens`` more tokens.

        ``computed_blocks`` (a prefix hit, on first scheduling) join its table first.
        Returns:
            The ids of the blocks appended to its block table (hits included), or None if
            the pool cannot hold them (nothing changes then).
        """
        req_blocks = self.req_to_blocks.setdefault(request.req_id, [])
        if self.kv_window is not None and req_blocks:
            self._release_outside_window(request, req_blocks)
        if not computed_blocks:
            # The common case (a decode step): room in the last block, nothing to pop.
            num_total = request.num_computed_tokens + num_new_tokens
            if -(-num_total // self.block_size) <= len(req_blocks):
                if self.enable_prefix_caching:
                    self._cache_full_blocks(request, req_blocks, num_total)
                return []
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_required = -(-num_total // self.block_size) - len(req_blocks) - len(computed_blocks)
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(num_required, 0) + num_evictable_hits > self.num_free_blocks:
            return None
        for block in computed_blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1
        new_blocks = [self._pop_free_block() for _ in range(max(num_required, 0))]
        req_blocks.extend(computed_blocks)
        req_blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, req_blocks, num_total)
        return [b.block_id for b in computed_blocks] + [b.block_id for b in new_blocks]

    def _pop_free_block(self) -> KVBlock:
        _, block = self.free_queue.popitem(last=False)
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
                self.removed_hashes.append(block.block_hash)
            block.block_hash = None
            block.token_ids = None
            block.parent_hash = None
        block.ref_cnt = 1
        return block

    def _cache_full_blocks(self, request: Request, req_blocks: list[KVBlock],
                           num_tokens: int) -> None:
        # Blocks fill with KV during the coming step; registering them now lets requests
        # scheduled later reuse them. Only blocks that became full since the last call are
        # looked at: a decode step usually fills none (this runs per request per step).
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        num_done = self._num_registered.get(request.req_id, 0)
        if num_full <= num_done:
            return
        self._num_registered[request.req_id] = num_full
        tokens = request.all_token_ids
        hashes = self._block_hashes(request, num_full * self.block_size)
        for i in range(num_done, num_full):
            block, block_hash = req_blocks[i], hashes[i]
            if block.block_hash is not None:
                continue
            block.block_hash = block_hash
            block.token_ids = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block.parent_hash = hashes[i - 1] if i else ROOT_HASH
            if block_hash not in self.cached_blocks:
                self.cached_blocks[block_hash] = block
                self.stored_hashes.append(block_hash)

    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay reusable until evicted."""
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self._req_to_hashes.pop(request.req_id, None)
        self._num_registered.pop(request.req_id, None)
        num_released = self._num_released.pop(request.req_id, 0)
        # Tail blocks are the least likely to be shared: evict them first.
        for block in reversed(blocks[num_released:]):
            self._unref(block)

    def _unref(self, block: KVBlock) -> None:
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block.block_id] = block
            if block.block_hash is None:
                self.free_queue.move_to_end(block.block_id, last=False)

    def num_cached_prefix_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of a prefix (its chained ``hashes``) are cached."""
        num = 0
        for block_hash in hashes:
            if block_hash not in self.cached_blocks:
                break
            num += 1
        return num

    def block_tables(self) -> dict[str, list[int]]:
        """Every request's block ids."""
        return {req_id: [b.block_id for b in blocks]
                for req_id, blocks in self.req_to_blocks.items() if blocks}

    def cached_entry(self, block_hash: int) -> tuple[int, tuple[int, ...]] | None:
        """``(block id, token ids)`` of a cached block, or None if the hash is not cached."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids is None:
            return None
        return block.block_id, block.token_ids

    def cached_entries(self) -> dict[int, tuple[int, tuple[int, ...]]]:
        """Every cached block: hash -> ``(block id, token ids)``."""
        return {h: (b.block_id, b.token_ids or ()) for h, b in self.cached_blocks.items()}

    def cached_parent(self, block_hash: int) -> int | None:
        """The parent hash of a cached block (ROOT_HASH for a first block), None if the
        hash is not cached or its parent is unknown."""
        block = self.cached_blocks.get(block_hash)
        return None if block is None else block.parent_hash

    def restore_cached(self, entries: dict[int, tuple[int, tuple[int, ...]]],
                       parents: dict[int, int] | None = None) -> int:
        """Register cached (free) blocks, e.g. a prefix cache mirrored before a restart.

        Args:
            entries: block hash -> (block id, its token ids); inconsistent ones are skipped
                (an id outside the pool, a wrong length, a block in use or already cached).
            parents: block hash -> its parent's hash, where known.
        Returns:
            The number of blocks restored.
        """
        restored = 0
        for block_hash, (block_id, token_ids) in entries.items():
            if not 0 <= block_id < self.num_blocks or len(token_ids) != self.block_size:
                continue
            block = self.blocks[block_id]
            if (block.block_hash is not None or block.ref_cnt != 0
                    or block_hash in self.cached_blocks):
                continue
            block.block_hash, block.token_ids = block_hash, tuple(token_ids)
            block.parent_hash = (parents or {}).get(block_hash)
            self.cached_blocks[block_hash] = block
            # Cached blocks go behind the never-used ones: evicted last.
            self.free_queue.move_to_end(block_id)
            restored += 1
        return restored

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            if block.block_hash is not None:
                self.removed_hashes.append(block.block_hash)
            block.block_hash, block.token_ids, block.parent_hash = None, None, None
        self.cached_blocks.clear()
        return True

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Hashes stored and removed since the last call."""
        stored, removed = self.stored_hashes, self.removed_hashes
        self.stored_hashes, self.removed_hashes = [], []
        return stored, removed
