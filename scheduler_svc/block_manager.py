"""Paged KV blocks: reference counts, an LRU free queue and automatic prefix caching.

A full block is identified by a chained hash of (parent block hash, its token ids, an
extra key), so a hash names a whole prefix. Freed blocks keep their hash and stay
reusable until evicted; the free queue hands out first what is least worth keeping.

**KV groups.** A model whose layers attend differently (Gemma 2's local sliding-window
layers and global layers) has several KV groups: each group has its own block table per
request, and all groups draw block ids from the one pool (a block id holds the KV of one
group's layers; see worker_svc/kv_groups.py). Most models have one group.

When a group's layers see only a window of the latest ``window`` tokens, a request's
leading blocks of that group that no query of its coming steps can see are given back as
it advances, so it holds about ``window / block_size`` blocks there. Their ids stay in
the request's table, positionally (the runner's kernels start at the window and never
read them; the worker's steps run in order, so a block reused by another request in this
step is written after every earlier step's reads).

Prefix caching with several groups: a hit of ``h`` blocks needs the first group's blocks
``0..h-1`` (a full-attention group) and, in each windowed group, only the blocks the
next query can see; the table entries before those are placeholders (block id 0, never
read). Cached blocks are kept per group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
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
    # The KV group whose prefix cache holds the block (meaningful with block_hash).
    group: int = 0


# A table entry of a windowed group before the window, never allocated (a request that
# started from a prefix hit): its id is never read. Not in the pool; ref_cnt 1 keeps it
# out of every count of evictable blocks.
_PLACEHOLDER = KVBlock(0, ref_cnt=1)


class BlockManager:
    """Owns the KV block pool of one worker.

    Args:
        num_blocks: block ids in the pool (shared by every KV group).
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks across requests by content hash.
        kv_window: the window of a model with one KV group whose layers all have it.
        group_windows: each KV group's window (None: full attention), full-attention
            groups first; instead of ``kv_window`` for a model with several groups.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 kv_window: int | None = None,
                 group_windows: Sequence[int | None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if group_windows is None:
            group_windows = (kv_window,)
        elif kv_window is not None:
            raise ValueError("pass kv_window (one KV group) or group_windows, not both.")
        group_windows = tuple(group_windows)
        if not group_windows:
            raise ValueError("group_windows must name at least one KV group.")
        for window in group_windows:
            if window is not None and window < 1:
                raise ValueError(f"kv_window must be positive, got {window}.")
        self.group_windows = group_windows
        self.num_groups = len(group_windows)
        self.kv_window = group_windows[0] if self.num_groups == 1 else None
        self._has_windows = any(w is not None for w in group_windows)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, first out first: unhashed ones, then cached ones by LRU.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks)
        # Per group: block hash -> cached block; req_id -> its block table.
        self._cached: list[dict[int, KVBlock]] = [{} for _ in group_windows]
        self._tables: list[dict[str, list[KVBlock]]] = [{} for _ in group_windows]
        self.cached_blocks = self._cached[0]
        self.req_to_blocks = self._tables[0]
        self._req_to_hashes: dict[str, list[int]] = {}
        # Per group: req_id -> leading blocks of its table registered in the prefix cache.
        self._num_registered: list[dict[str, int]] = [{} for _ in group_windows]
        # Per group: req_id -> leading blocks of its table given back (outside the window).
        self._num_released: list[dict[str, int]] = [{} for _ in group_windows]
        # Prefix hits need a full-attention first group when there are several.
        self._can_hit_groups = self.num_groups == 1 or group_windows[0] is None
        # Prefix-cache counters, in tokens (as vLLM counts them).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Hashes stored/evicted since the last drain (read by the Redis mirror): the first
        # group's, and (group, hash) of the others.
        self.stored_hashes: list[int] = []
        self.removed_hashes: list[int] = []
        self.stored_group_hashes: list[tuple[int, int]] = []
        self.removed_group_hashes: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, req_id: str) -> list[int]:
        """The request's block table in the first KV group (the only one of most models)."""
        return [b.block_id for b in self.req_to_blocks.get(req_id, [])]

    def get_group_block_ids(self, req_id: str) -> list[list[int]]:
        """The request's block tables in the KV groups after the first."""
        return [[b.block_id for b in tables.get(req_id, [])] for tables in self._tables[1:]]

    def num_held_blocks(self, req_id: str, group: int = 0) -> int:
        """Blocks the request holds now in ``group`` (its table less those given back)."""
        return (len(self._tables[group].get(req_id, ()))
                - self._num_released[group].get(req_id, 0))

    def _first_visible(self, group: int, num_computed: int) -> int:
        """The first block of ``group`` a query at position ``num_computed`` (or later)
        can see: it sees keys after ``num_computed - window``."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(num_computed - window + 1, 0) // self.block_size

    def _release_outside_window(self, group: int, request: Request,
                                req_blocks: list[KVBlock]) -> None:
        # The coming step's first query is at num_computed_tokens; later queries see less.
        num_dead = self._first_visible(group, request.num_computed_tokens)
        released = self._num_released[group]
        num_released = released.get(request.req_id, 0)
        if num_dead <= num_released:
            return
        num_dead = min(num_dead, len(req_blocks))
        released[request.req_id] = num_dead
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

    def _cached_hit(self, group: int, block_hash: int, tokens: list[int],
                    index: int) -> KVBlock | None:
        block = self._cached[group].get(block_hash)
        chunk = tuple(tokens[index * self.block_size:(index + 1) * self.block_size])
        return None if block is None or block.token_ids != chunk else block

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, in full blocks.

        At least one token is always left to compute, so the step yields logits. With
        several KV groups the prefix is also cached where each windowed group needs it.
        Returns:
            The first group's cached blocks and the number of tokens they hold.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        tokens = request.all_token_ids
        hashes = self._block_hashes(request, request.num_tokens - 1)
        hits: list[KVBlock] = []
        if self._can_hit_groups:
            for i, block_hash in enumerate(hashes):
                block = self._cached_hit(0, block_hash, tokens, i)
                if block is None:
                    break
                hits.append(block)
        if self.num_groups > 1 and hits:
            hits = hits[:self._longest_group_hit(request, hashes, len(hits))]
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def _longest_group_hit(self, request: Request, hashes: list[int], num: int) -> int:
        """The most of the first ``num`` blocks every other group has cached where it
        needs them (windowed groups: the blocks the next query sees)."""
        tokens = request.all_token_ids
        # Per group: length of the run of cached blocks that ends at each block.
        runs = []
        for group in range(1, self.num_groups):
            run, length = [], 0
            for i in range(num):
                hit = self._cached_hit(group, hashes[i], tokens, i)
                length = length + 1 if hit is not None else 0
                run.append(length)
            runs.append(run)
        for n in range(num, 0, -1):
            if all(run[n - 1] >= n - self._first_visible(group, n * self.block_size)
                   for group, run in enumerate(runs, start=1)):
                return n
        return 0

    def _group_hits(self, request: Request, computed_blocks: list[KVBlock]
                    ) -> list[list[KVBlock]]:
        """Each group's share of a prefix hit of ``computed_blocks`` (the first group's)."""
        num = len(computed_blocks)
        hashes = self._block_hashes(request, num * self.block_size)
        hits = [computed_blocks]
        for group in range(1, self.num_groups):
            first = self._first_visible(group, num * self.block_size)
            cached = self._cached[group]
            hits.append([_PLACEHOLDER] * first + [cached[hashes[i]] for i in range(first, num)])
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """``allocate_group_slots`` for the first group's ids (a model with one group)."""
        new_ids = self.allocate_group_slots(request, num_new_tokens, computed_blocks)
        return None if new_ids is None else new_ids[0]

    def allocate_group_slots(self, request: Request, num_new_tokens: int,
                             computed_blocks: list[KVBlock] | None = None
                             ) -> list[list[int]] | None:
        """Give the request room for ``num_new_tokens`` more tokens in every group.

        ``computed_blocks`` (a prefix hit from ``get_computed_blocks``, on first
        scheduling) join its tables first.
        Returns:
            Per group, the ids of the blocks appended to its block table (hits included),
            or None if the pool cannot hold them (nothing changes then).
        """
        req_id = request.req_id
        if not computed_blocks and self.num_groups == 1 and not self._has_windows:
            # The most common call (one group, a decode step): room in the last block.
            table = self._tables[0].get(req_id)
            num_total = request.num_computed_tokens + num_new_tokens
            if table is not None and num_total <= len(table) * self.block_size:
                if self.enable_prefix_caching:
                    self._cache_full_blocks(0, request, table, num_total)
                return [[]]
        tables = [t.setdefault(req_id, []) for t in self._tables]
        if self._has_windows and tables[0]:
            for group, window in enumerate(self.group_windows):
                if window is not None:
                    self._release_outside_window(group, request, tables[group])
        if not computed_blocks:
            # The common case (a decode step): room in the last block, nothing to pop.
            num_total = request.num_computed_tokens + num_new_tokens
            num_needed = -(-num_total // self.block_size)
            if all(num_needed <= len(t) for t in tables):
                if self.enable_prefix_caching:
                    for group, table in enumerate(tables):
                        self._cache_full_blocks(group, request, table, num_total)
                return [[] for _ in tables]
        hits = (self._group_hits(request, computed_blocks) if computed_blocks
                else [[] for _ in tables])
        num_computed = request.num_computed_tokens + len(hits[0]) * self.block_size
        num_total = num_computed + num_new_tokens
        num_needed = -(-num_total // self.block_size)
        num_required = [max(num_needed - len(t) - len(h), 0)
                        for t, h in zip(tables, hits, strict=True)]
        num_evictable_hits = sum(1 for h in hits for b in h if b.ref_cnt == 0)
        if sum(num_required) + num_evictable_hits > self.num_free_blocks:
            return None
        new_ids = []
        for group, (table, group_hits) in enumerate(zip(tables, hits, strict=True)):
            num_placeholders = 0
            for block in group_hits:
                if block is _PLACEHOLDER:
                    num_placeholders += 1
                    continue
                if block.ref_cnt == 0:
                    del self.free_queue[block.block_id]
                block.ref_cnt += 1
            if num_placeholders:
                self._num_released[group][req_id] = num_placeholders
            new_blocks = [self._pop_free_block() for _ in range(num_required[group])]
            table.extend(group_hits)
            table.extend(new_blocks)
            if self.enable_prefix_caching:
                self._cache_full_blocks(group, request, table, num_total)
            new_ids.append([b.block_id for b in group_hits] + [b.block_id for b in new_blocks])
        return new_ids

    def _pop_free_block(self) -> KVBlock:
        _, block = self.free_queue.popitem(last=False)
        if block.block_hash is not None:
            cached = self._cached[block.group]
            if cached.get(block.block_hash) is block:
                del cached[block.block_hash]
                if block.group == 0:
                    self.removed_hashes.append(block.block_hash)
                else:
                    self.removed_group_hashes.append((block.group, block.block_hash))
            block.block_hash = None
            block.token_ids = None
            block.parent_hash = None
        block.ref_cnt = 1
        return block

    def _cache_full_blocks(self, group: int, request: Request, req_blocks: list[KVBlock],
                           num_tokens: int) -> None:
        # Blocks fill with KV during the coming step; registering them now lets requests
        # scheduled later reuse them. Only blocks that became full since the last call are
        # looked at: a decode step usually fills none (this runs per request per step).
        # Blocks given back (or placeholders) before registration are skipped.
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        registered = self._num_registered[group]
        num_done = registered.get(request.req_id, 0)
        if num_full <= num_done:
            return
        registered[request.req_id] = num_full
        num_done = max(num_done, self._num_released[group].get(request.req_id, 0))
        tokens = request.all_token_ids
        hashes = self._block_hashes(request, num_full * self.block_size)
        cached = self._cached[group]
        for i in range(num_done, num_full):
            block, block_hash = req_blocks[i], hashes[i]
            if block.block_hash is not None:
                continue
            block.block_hash = block_hash
            block.token_ids = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block.parent_hash = hashes[i - 1] if i else ROOT_HASH
            block.group = group
            if block_hash not in cached:
                cached[block_hash] = block
                if group == 0:
                    self.stored_hashes.append(block_hash)
                else:
                    self.stored_group_hashes.append((group, block_hash))

    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay reusable until evicted."""
        self._req_to_hashes.pop(request.req_id, None)
        for group in range(self.num_groups):
            blocks = self._tables[group].pop(request.req_id, [])
            self._num_registered[group].pop(request.req_id, None)
            num_released = self._num_released[group].pop(request.req_id, 0)
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
        """How many leading blocks of a prefix (its chained ``hashes``) are cached (in the
        first group)."""
        num = 0
        for block_hash in hashes:
            if block_hash not in self.cached_blocks:
                break
            num += 1
        return num

    def block_tables(self) -> dict[str, list[int]]:
        """Every request's block ids (first group)."""
        return {req_id: [b.block_id for b in blocks]
                for req_id, blocks in self.req_to_blocks.items() if blocks}

    def group_block_tables(self) -> dict[str, list[list[int]]]:
        """Every request's block ids, per group."""
        return {req_id: [self.get_block_ids(req_id), *self.get_group_block_ids(req_id)]
                for req_id, blocks in self.req_to_blocks.items() if blocks}

    def cached_entry(self, block_hash: int, group: int = 0
                     ) -> tuple[int, tuple[int, ...]] | None:
        """``(block id, token ids)`` of a cached block, or None if the hash is not cached."""
        block = self._cached[group].get(block_hash)
        if block is None or block.token_ids is None:
            return None
        return block.block_id, block.token_ids

    def cached_entries(self, group: int = 0) -> dict[int, tuple[int, tuple[int, ...]]]:
        """Every cached block of ``group``: hash -> ``(block id, token ids)``."""
        return {h: (b.block_id, b.token_ids or ()) for h, b in self._cached[group].items()}

    def cached_parent(self, block_hash: int, group: int = 0) -> int | None:
        """The parent hash of a cached block (ROOT_HASH for a first block), None if the
        hash is not cached or its parent is unknown."""
        block = self._cached[group].get(block_hash)
        return None if block is None else block.parent_hash

    def restore_cached(self, entries: dict[int, tuple[int, tuple[int, ...]]],
                       parents: dict[int, int] | None = None, group: int = 0) -> int:
        """Register cached (free) blocks, e.g. a prefix cache mirrored before a restart.

        Args:
            entries: block hash -> (block id, its token ids); inconsistent ones are skipped
                (an id outside the pool, a wrong length, a block in use or already cached).
            parents: block hash -> its parent's hash, where known.
            group: the KV group they were cached in.
        Returns:
            The number of blocks restored.
        """
        if not 0 <= group < self.num_groups:
            return 0
        cached = self._cached[group]
        restored = 0
        for block_hash, (block_id, token_ids) in entries.items():
            if not 0 <= block_id < self.num_blocks or len(token_ids) != self.block_size:
                continue
            block = self.blocks[block_id]
            if (block.block_hash is not None or block.ref_cnt != 0
                    or block_hash in cached):
                continue
            block.block_hash, block.token_ids = block_hash, tuple(token_ids)
            block.parent_hash = (parents or {}).get(block_hash)
            block.group = group
            cached[block_hash] = block
            # Cached blocks go behind the never-used ones: evicted last.
            self.free_queue.move_to_end(block_id)
            restored += 1
        return restored

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            if block.block_hash is not None and self._cached[block.group].get(
                    block.block_hash) is block:
                if block.group == 0:
                    self.removed_hashes.append(block.block_hash)
                else:
                    self.removed_group_hashes.append((block.group, block.block_hash))
            block.block_hash, block.token_ids, block.parent_hash = None, None, None
        for cached in self._cached:
            cached.clear()
        return True

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Hashes stored and removed (first group) since the last call."""
        stored, removed = self.stored_hashes, self.removed_hashes
        self.stored_hashes, self.removed_hashes = [], []
        return stored, removed

    def drain_group_events(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(group, hash)`` stored and removed in the other groups since the last call."""
        stored, removed = self.stored_group_hashes, self.removed_group_hashes
        self.stored_group_hashes, self.removed_group_hashes = [], []
        return stored, removed
