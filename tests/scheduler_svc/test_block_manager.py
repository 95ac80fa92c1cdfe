from gridllm.common.prefix_hash import hash_block
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.request import Request


def make_request(req_id, tokens, **params):
    return Request(req_id, list(tokens), SamplingParams(**params))


def schedule_whole(bm, request):
    blocks, num_hit = bm.get_computed_blocks(request)
    ids = bm.allocate_slots(request, request.num_tokens - num_hit, blocks)
    assert ids is not None
    request.num_computed_tokens = request.num_tokens
    return ids, num_hit


def test_allocation_counts_blocks_and_frees_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", range(10))
    ids, hit = schedule_whole(bm, req)
    assert hit == 0 and len(ids) == 3 and len(set(ids)) == 3
    assert bm.num_free_blocks == 5
    # Growing by one token inside the last block needs no new block; crossing needs one.
    req.output_token_ids += [100, 101]
    assert bm.allocate_slots(req, 2) == []
    req.num_computed_tokens += 2
    req.output_token_ids.append(102)
    assert len(bm.allocate_slots(req, 1)) == 1
    bm.free(req)
    assert bm.num_free_blocks == 8


def test_allocation_refused_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", range(9))
    assert bm.allocate_slots(req, 9) is None
    assert bm.num_free_blocks == 2
    assert bm.get_block_ids("a") == []


def test_prefix_hit_on_full_blocks_only_and_counters():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_request("a", range(10))
    schedule_whole(bm, first)
    bm.free(first)
    second = make_request("b", list(range(10)) + [55, 56])
    ids, hit = schedule_whole(bm, second)
    # Two full blocks (8 tokens) of the shared 10-token prefix are reused.
    assert hit == 8
    assert ids[:2] == [b.block_id for b in bm.req_to_blocks["b"][:2]]
    assert bm.prefix_cache_queries == 10 + 12 and bm.prefix_cache_hits == 8


def test_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_request("a", range(8))
    schedule_whole(bm, first)
    bm.free(first)
    again = make_request("b", range(8))
    _, hit = schedule_whole(bm, again)
    assert hit == 4  # the last block would leave nothing to compute


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", range(9))
    schedule_whole(bm, a)
    b = make_request("b", range(9))
    ids_b, hit = schedule_whole(bm, b)
    assert hit == 8
    shared = bm.req_to_blocks["a"][:2]
    assert all(block.ref_cnt == 2 for block in shared)
    bm.free(a)
    assert all(block.ref_cnt == 1 for block in shared)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_eviction_is_lru_and_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", range(4))       # 2 blocks, both full -> cached
    schedule_whole(bm, a)
    bm.free(a)
    b = make_request("b", range(100, 104))  # takes the 2 never-used blocks
    schedule_whole(bm, b)
    bm.free(b)
    # Free queue now: a's blocks (tail first), then b's (tail first).
    order = list(bm.free_queue)
    a_blocks, b_blocks = order[:2], order[2:]
    c = make_request("c", range(200, 202))  # one block: evicts the LRU one, a's tail
    schedule_whole(bm, c)
    evicted = bm.req_to_blocks["c"][0].block_id
    assert evicted == a_blocks[0]
    # a's first block is still a hit.
    d = make_request("d", [0, 1, 7])
    _, hit = schedule_whole(bm, d)
    assert hit == 2
    # d's second block is the next least recently used: b's tail.
    assert bm.req_to_blocks["d"][1].block_id == b_blocks[0]
    assert list(bm.free_queue) == [b_blocks[1]]


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3])
    schedule_whole(bm, a)
    bm.free(a)
    # Forge a collision: point a's hash at a block holding other tokens.
    block_hash = hash_block(0, (1, 2), None)
    bm.cached_blocks[block_hash].token_ids = (9, 9)
    b = make_request("b", [1, 2, 3])
    _, hit = schedule_whole(bm, b)
    assert hit == 0


def test_cache_salt_separates_prefixes():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3])
    schedule_whole(bm, a)
    bm.free(a)
    b = make_request("b", [1, 2, 3])
    b.cache_salt = "tenant-b"
    _, hit = schedule_whole(bm, b)
    assert hit == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3])
    schedule_whole(bm, a)
    bm.free(a)
    _, hit = schedule_whole(bm, make_request("b", [1, 2, 3]))
    assert hit == 0


def test_prompt_logprobs_requests_skip_the_cache():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3])
    schedule_whole(bm, a)
    bm.free(a)
    _, hit = schedule_whole(bm, make_request("b", [1, 2, 3], prompt_logprobs=1))
    assert hit == 0


def test_events_report_stored_and_evicted_hashes():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_request("a", [1, 2, 3])
    schedule_whole(bm, a)
    stored, removed = bm.drain_events()
    assert stored == [hash_block(0, (1, 2), None)] and removed == []
    bm.free(a)
    schedule_whole(bm, make_request("b", [7, 8, 9, 10]))
    _, removed = bm.drain_events()
    assert removed == stored


def test_blocks_before_the_window_are_given_back_once_and_shared_ones_stay():
    bm = BlockManager(num_blocks=16, block_size=4, kv_window=6)
    prompt = list(range(12))
    first = make_request("a", prompt + [50])
    schedule_whole(bm, first)  # 13 tokens: 4 blocks, the first three full and cached
    second = make_request("b", prompt + [60])
    _, num_hit = schedule_whole(bm, second)  # shares those three blocks
    assert num_hit == 12 and bm.num_free_blocks == 11
    # "a" computed 13 tokens: its next query (position 13) sees keys 8.. -> blocks 0, 1 go.
    first.output_token_ids.append(1)
    assert bm.allocate_slots(first, 1) == []
    assert bm.num_held_blocks("a") == 2
    # Still referenced by "b": nothing returns to the pool yet.
    assert bm.num_free_blocks == 11
    # Again at the same position: nothing is given back twice.
    assert bm.allocate_slots(first, 1) == []
    assert bm.num_held_blocks("a") == 2 and bm.num_free_blocks == 11
    bm.free(second)
    assert bm.num_free_blocks == 14  # b's own block, and blocks 0, 1 now unreferenced
    bm.free(first)
    assert bm.num_free_blocks == 16
    # The given-back blocks stayed cached: a new request still hits the prefix.
    assert bm.get_computed_blocks(make_request("c", prompt + [70]))[1] == 12


def test_kv_window_must_be_positive():
    import pytest

    with pytest.raises(ValueError, match="kv_window"):
        BlockManager(num_blocks=4, block_size=4, kv_window=0)
