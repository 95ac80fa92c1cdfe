"""Per-request runner state and the packing of one step's batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gridllm.common.contract import NewRequestData
from gridllm.common.sampling_params import SamplingParams
from worker_svc.layers.attention import AttentionMetadata


@dataclass
class RequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    num_prompt_tokens: int
    # Prompt followed by every generated token (sampled ones are appended here).
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Philox key of the request's draws (its seed, or one drawn at admission).
    seed: int
    # Prompt logprobs are reported once: a request rebuilt after preemption already sent them.
    needs_prompt_logprobs: bool

    @classmethod
    def from_new(cls, new: NewRequestData, seed: int) -> RequestState:
        params = new.sampling_params
        return cls(req_id=new.req_id, num_prompt_tokens=len(new.prompt_token_ids),
                   token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                   sampling_params=params, block_ids=list(new.block_ids),
                   num_computed_tokens=new.num_computed_tokens, seed=seed,
                   needs_prompt_logprobs=(params.prompt_logprobs is not None
                                          and not new.output_token_ids))

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Per request: first position computed this step and the number of tokens.
    starts: list[int]
    num_tokens: list[int]
    # Row of the last token of each request in the packed batch.
    last_rows: list[int]


def prepare_inputs(states: list[RequestState], num_scheduled: list[int], block_size: int,
                   device: torch.device) -> BatchInputs:
    """Pack the scheduled chunks of ``states`` into one varlen batch.

    Args:
        states: requests in batch order.
        num_scheduled: tokens to compute for each, starting at its ``num_computed_tokens``.
        block_size: tokens per KV block.
        device: where the tensors go.
    Raises:
        ValueError: a chunk runs past the request's known tokens or its blocks.
    """
    input_ids: list[int] = []
    starts, ends = [], []
    max_blocks = max(len(s.block_ids) for s in states)
    block_tables = np.zeros((len(states), max(max_blocks, 1)), dtype=np.int64)
    for i, (state, n) in enumerate(zip(states, num_scheduled, strict=True)):
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        if end > len(state.token_ids) or end > len(state.block_ids) * block_size:
            raise ValueError(
                f"request {state.req_id!r}: scheduled tokens [{start}, {end}) exceed its "
                f"{len(state.token_ids)} known tokens or {len(state.block_ids)} blocks.")
        input_ids.extend(state.token_ids[start:end])
        starts.append(start)
        ends.append(end)
        block_tables[i, :len(state.block_ids)] = state.block_ids
    counts = np.asarray(num_scheduled, dtype=np.int64)
    req_index = np.repeat(np.arange(len(states)), counts)
    cu = np.concatenate(([0], np.cumsum(counts)))
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], counts) + np.repeat(starts, counts)
    slots = block_tables[req_index, positions // block_size] * block_size + positions % block_size
    metadata = AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.from_numpy(cu.astype(np.int32)).to(device),
        seq_lens=torch.tensor(ends, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(block_tables.astype(np.int32)).to(device),
        max_query_len=int(counts.max()), max_seq_len=max(ends))
    return BatchInputs(input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
                       positions=torch.from_numpy(positions).to(device),
                       attn_metadata=metadata, starts=starts, num_tokens=list(num_scheduled),
                       last_rows=(cu[1:] - 1).tolist())
