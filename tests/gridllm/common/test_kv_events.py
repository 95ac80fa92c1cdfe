"""gridllm.common.kv_events: the log's encoding, the protobuf form and chain grouping."""

from __future__ import annotations

import pytest

from gridllm.common import kv_events
from gridllm.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from gridllm.common.prefix_hash import ROOT_HASH, block_hashes

EVENTS = [
    KvEvent("w1", BlockStored([2**64 - 1, 7], 2**63 + 5, [1, 2, 3, 4, 5, 6, 7, 8], 4), "s1",
            1.5, 3),
    KvEvent("w1", BlockStored([9], None, [0, 0, 0, 0], 4), "s1", 2.0, 4),
    KvEvent("w2", BlockRemoved([1, 2**64 - 2]), "s2", 3.25, 5),
    KvEvent("w2", AllBlocksCleared(), "s2", 4.0, 6),
]


@pytest.mark.parametrize("event", EVENTS)
def test_log_encoding_and_protobuf_round_trip(event):
    assert kv_events.decode(kv_events.encode(event), event.sequence_number) == event
    assert kv_events.decode(kv_events.encode(event).encode(), event.sequence_number) == event
    msg = kv_events.to_pb(event)
    assert kv_events.from_pb(msg) == event
    if isinstance(event.data, BlockStored):
        assert msg.block_stored.num_tokens == len(event.data.block_hashes) * 4
        assert msg.block_stored.HasField("parent_block_hash") == (
            event.data.parent_block_hash is not None)


@pytest.mark.parametrize("raw", ["", "{}", '{"k": "moved", "w": "x"}', '{"k": "stored"}', "[1]"])
def test_malformed_log_entries_are_refused(raw):
    with pytest.raises(ValueError, match="malformed KV event"):
        kv_events.decode(raw, 1)


def test_entry_ids_carry_the_sequence_number():
    assert kv_events.entry_id(42) == "0-42"
    assert kv_events.sequence_of(b"0-42") == kv_events.sequence_of("0-42") == 42


def test_stored_blocks_group_into_parent_chains():
    tokens = list(range(100, 124))
    hashes = block_hashes(tokens, 4)  # six chained blocks
    other = block_hashes(list(range(500, 508)), 4)  # two blocks of another prompt
    chunks = [tuple(tokens[i * 4:(i + 1) * 4]) for i in range(6)]
    # Blocks 2..5 of the first prompt (its first two were stored earlier), then another
    # prompt's first two blocks.
    chains = kv_events.stored_chains(
        hashes[2:] + other, [hashes[1], hashes[2], hashes[3], hashes[4], ROOT_HASH, other[0]],
        chunks[2:] + [(500, 501, 502, 503), (504, 505, 506, 507)], 4)
    assert [c.block_hashes for c in chains] == [hashes[2:], other]
    assert [c.parent_block_hash for c in chains] == [hashes[1], None]
    assert chains[0].token_ids == tokens[8:] and chains[0].num_tokens == 16
    # An unknown parent starts a chain of its own.
    assert len(kv_events.stored_chains([1, 2], [None, None], [(0,) * 4] * 2, 4)) == 2
