"""KV-cache events: what entered and left each worker's prefix cache, as one ordered log.

Schedulers publish them (scheduler_svc.kv_events) to a Redis stream whose entry ids carry a
stack-wide sequence number; routers read it to keep their prefix index and serve it to
external routers (``Generation.SubscribeKvEvents``). Events are net changes per scheduler
step, removals first, so applying them in order as set operations yields each worker's
cache as it stands after that step (re-applying an event is harmless).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gridllm.common.prefix_hash import ROOT_HASH
from gridllm.v1 import generate_pb2


@dataclass
class BlockStored:
    # Chained hashes, in prefix order: each block is the parent of the next.
    block_hashes: list[int]
    # Hash of the block before the first one; None: the chain starts a sequence, or its
    # parent is unknown.
    parent_block_hash: int | None = None
    # The blocks' token ids, concatenated.
    token_ids: list[int] = field(default_factory=list)
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.block_hashes) * self.block_size


@dataclass
class BlockRemoved:
    block_hashes: list[int]


@dataclass
class AllBlocksCleared:
    pass


EventData = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class KvEvent:
    worker_id: str
    data: EventData
    scheduler_id: str = ""
    # Seconds since the epoch at publication.
    timestamp: float = 0.0
    # Position in the log; 0 until the log assigned one.
    sequence_number: int = 0


_KINDS = {BlockStored: "stored", BlockRemoved: "removed", AllBlocksCleared: "cleared"}


def encode(event: KvEvent) -> str:
    """The event as the compact JSON stored in the log (without its sequence number)."""
    data = event.data
    record: dict = {"k": _KINDS[type(data)], "w": event.worker_id, "s": event.scheduler_id,
                    "t": round(event.timestamp, 6)}
    if isinstance(data, BlockStored):
        record.update(h=data.block_hashes, p=data.parent_block_hash, x=data.token_ids,
                      b=data.block_size)
    elif isinstance(data, BlockRemoved):
        record["h"] = data.block_hashes
    return json.dumps(record, separators=(",", ":"))


def decode(raw: str | bytes, sequence_number: int) -> KvEvent:
    """An event read from the log (ValueError if it is not one)."""
    try:
        record = json.loads(raw)
        kind = record["k"]
        if kind == "stored":
            data: EventData = BlockStored([int(h) for h in record["h"]], record.get("p"),
                                          [int(t) for t in record.get("x", [])],
                                          int(record.get("b", 0)))
        elif kind == "removed":
            data = BlockRemoved([int(h) for h in record["h"]])
        elif kind == "cleared":
            data = AllBlocksCleared()
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return KvEvent(record["w"], data, record.get("s", ""), float(record.get("t", 0.0)),
                       sequence_number)
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"malformed KV event {raw!r}: {exc}") from exc


def entry_id(sequence_number: int) -> str:
    """The Redis stream entry id of a sequence number."""
    return f"0-{sequence_number}"


def sequence_of(entry: str | bytes) -> int:
    """The sequence number of a Redis stream entry id (``0-<n>``)."""
    if isinstance(entry, bytes):
        entry = entry.decode()
    return int(entry.partition("-")[2])


def stored_chains(block_hashes: list[int], parents: list[int | None],
                  token_ids: list[tuple[int, ...]], block_size: int) -> list[BlockStored]:
    """Stored blocks grouped into chains: a block whose parent is the block before it
    joins that block's event (a prompt's blocks are stored in prefix order)."""
    chains: list[BlockStored] = []
    for block_hash, parent, tokens in zip(block_hashes, parents, token_ids, strict=True):
        last = chains[-1] if chains else None
        if last is not None and parent is not None and last.block_hashes[-1] == parent:
            last.block_hashes.append(block_hash)
            last.token_ids.extend(tokens)
        else:
            chains.append(BlockStored([block_hash],
                                      None if parent in (None, ROOT_HASH) else parent,
                                      list(tokens), block_size))
    return chains


def to_pb(event: KvEvent) -> generate_pb2.KvEvent:
    msg = generate_pb2.KvEvent(sequence_number=event.sequence_number,
                               scheduler_id=event.scheduler_id, worker_id=event.worker_id,
                               timestamp=event.timestamp)
    data = event.data
    if isinstance(data, BlockStored):
        msg.block_stored.block_hashes.extend(data.block_hashes)
        if data.parent_block_hash is not None:
            msg.block_stored.parent_block_hash = data.parent_block_hash
        msg.block_stored.num_tokens = data.num_tokens
        msg.block_stored.token_ids.extend(data.token_ids)
        msg.block_stored.block_size = data.block_size
    elif isinstance(data, BlockRemoved):
        msg.block_removed.block_hashes.extend(data.block_hashes)
    else:
        msg.all_blocks_cleared.SetInParent()
    return msg


def from_pb(msg: generate_pb2.KvEvent) -> KvEvent:
    kind = msg.WhichOneof("event")
    if kind == "block_stored":
        stored = msg.block_stored
        data: EventData = BlockStored(
            list(stored.block_hashes),
            stored.parent_block_hash if stored.HasField("parent_block_hash") else None,
            list(stored.token_ids), stored.block_size)
    elif kind == "block_removed":
        data = BlockRemoved(list(msg.block_removed.block_hashes))
    else:
        data = AllBlocksCleared()
    return KvEvent(msg.worker_id, data, msg.scheduler_id, msg.timestamp, msg.sequence_number)
