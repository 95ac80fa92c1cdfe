"""The persistent input batch (vLLM v1's InputBatch).

The batch keeps the requests of the current step as rows of preallocated host arrays
(token ids, block tables, positions, sampling parameters) and, when a row has penalties,
of device tables (prompt mask, output counts). A step's deltas update rows in place; a
finished or unscheduled request's row is filled by the last row (no re-packing). Each
step's inputs are computed with vectorised numpy and reach the device in one copy.

A sampled token's id stays on the device until the step's output is read: a row whose
next input is such a token gets it from the previous step's samples on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker_svc.layers import ops
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.request_state import RequestState, has_penalties, needs_masking
from worker_svc.sampling_metadata import SamplingMetadata
from worker_svc.staging import HostToDevice

# Block tables are padded to a multiple of this width: kernels specialise on the stride.
_BLOCK_TABLE_ALIGN = 16


@dataclass
class BatchInputs:
    """One step's model inputs, on the device, in row order."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Per row (host): first position computed this step and the number of tokens.
    starts: np.ndarray
    num_tokens: np.ndarray
    # [B] rows of the last token of each request (the rows whose logits are sampled).
    logits_indices: torch.Tensor
    # Per row (host): True where the chunk reaches the end of the request's tokens, so
    # the sampled token is real (other rows' samples are discarded).
    is_sampling: np.ndarray
    # The sampler's per-row tensors for this step (see InputBatch.prepare).
    sampling: dict[str, torch.Tensor]


# Per-row sampling parameters: (array name, dtype, SamplingParams attribute).
_PARAM_ARRAYS = (("top_k", np.int32, "top_k"), ("top_p", np.float32, "top_p"),
                 ("min_p", np.float32, "min_p"),
                 ("presence_penalty", np.float32, "presence_penalty"),
                 ("frequency_penalty", np.float32, "frequency_penalty"),
                 ("repetition_penalty", np.float32, "repetition_penalty"))


class InputBatch:
    """The running requests' rows.

    Args:
        max_num_reqs: rows to preallocate (grown if a step holds more).
        max_model_len: longest request, in tokens.
        block_size: tokens per KV block.
        vocab_size: columns of the penalty tables.
        device: where the step's inputs go.
        num_groups: KV groups (worker_svc/kv_groups.py); the groups after the first keep
            their block tables in ``group_block_table``.
    """

    # Host arrays, one entry (or row) per request (allocated in _grow).
    token_ids: np.ndarray
    block_table: np.ndarray
    num_known: np.ndarray
    num_pending: np.ndarray
    num_prompt: np.ndarray
    num_computed: np.ndarray
    num_blocks: np.ndarray
    temperature: np.ndarray
    seeds: np.ndarray
    num_logprobs: np.ndarray
    is_filtered: np.ndarray
    is_masked: np.ndarray
    is_constrained: np.ndarray
    has_penalties: np.ndarray
    needs_prompt_logprobs: np.ndarray
    prev_sample_row: np.ndarray
    # [capacity, num_groups - 1, max_blocks] and [capacity, num_groups - 1]: the block
    # tables of the KV groups after the first (only with several groups).
    group_block_table: np.ndarray
    num_group_blocks: np.ndarray

    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int,
                 vocab_size: int, device: torch.device, num_groups: int = 1) -> None:
        self.num_groups = num_groups
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks_per_req = -(-max_model_len // block_size)
        self.vocab_size = vocab_size
        self.device = device
        self.states: list[RequestState] = []
        self.rows: dict[str, int] = {}
        self.capacity = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._grow(max(1, max_num_reqs))
        # [capacity, vocab] device tables, allocated when a row first has penalties.
        self.prompt_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        # The last step's samples (row-indexed, on the device) and its rows' states.
        self.last_sampled: torch.Tensor | None = None
        self._last_step_states: list[RequestState] = []
        self._last_step_rows = np.zeros(0, dtype=np.int64)
        self.staging = HostToDevice(device)

    # ---- rows --------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        specs: dict[str, tuple[Any, Any]] = {
            # Token ids the host knows (numpy's zeros are lazily paged in).
            "token_ids": ((capacity, self.max_model_len), np.int32),
            "block_table": ((capacity, self.max_blocks_per_req), np.int32),
            "num_known": (capacity, np.int64), "num_pending": (capacity, np.int64),
            "num_prompt": (capacity, np.int64), "num_computed": (capacity, np.int64),
            "num_blocks": (capacity, np.int64), "temperature": (capacity, np.float32),
            "seeds": (capacity, np.int64), "num_logprobs": (capacity, np.int64),
            "is_filtered": (capacity, np.bool_), "is_masked": (capacity, np.bool_),
            # Structured outputs: the row's grammar masks its samples.
            "is_constrained": (capacity, np.bool_),
            "has_penalties": (capacity, np.bool_), "needs_prompt_logprobs": (capacity, np.bool_),
            # Row of each request in the last step's samples, -1 if it sampled none there.
            "prev_sample_row": (capacity, np.int64),
            **{name: (capacity, dtype) for name, dtype, _ in _PARAM_ARRAYS},
        }
        if self.num_groups > 1:
            specs["group_block_table"] = (
                (capacity, self.num_groups - 1, self.max_blocks_per_req), np.int32)
            specs["num_group_blocks"] = ((capacity, self.num_groups - 1), np.int64)
        for name, (shape, dtype) in specs.items():
            grown = np.zeros(shape, dtype=dtype)
            old = self._arrays.get(name)
            if old is not None:
                grown[:old.shape[0]] = old
            self._arrays[name] = grown
            setattr(self, name, grown)
        if getattr(self, "prompt_mask", None) is not None:
            self._allocate_penalty_tables(capacity)
        self.capacity = capacity

    @property
    def num_reqs(self) -> int:
        return len(self.states)

    @property
    def req_ids(self) -> list[str]:
        return [s.req_id for s in self.states]

    def add(self, state: RequestState) -> int:
        """Append ``state`` as the last row; returns the row."""
        if self.num_groups > 1:
            self._check_group_tables(state.req_id, state.group_block_ids)
        row = len(self.states)
        if row == self.capacity:
            self._grow(2 * self.capacity)
        self.states.append(state)
        self.rows[state.req_id] = row
        num_known = len(state.token_ids)
        self.token_ids[row, :num_known] = state.token_ids
        self.num_known[row] = num_known
        self.num_pending[row] = state.num_pending_tokens
        self.num_prompt[row] = state.num_prompt_tokens
        self.num_computed[row] = state.num_computed_tokens
        self.block_table[row, :len(state.block_ids)] = state.block_ids
        self.num_blocks[row] = len(state.block_ids)
        for group, ids in enumerate(state.group_block_ids):
            self.group_block_table[row, group, :len(ids)] = ids
            self.num_group_blocks[row, group] = len(ids)
        params = state.sampling_params
        self.temperature[row] = 0.0 if params.is_greedy else params.temperature
        for name, _, attr in _PARAM_ARRAYS:
            self._arrays[name][row] = getattr(params, attr)
        self.seeds[row] = state.seed
        self.num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self.is_filtered[row] = not params.is_greedy and (
            params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)
        self.is_masked[row] = needs_masking(params)
        self.is_constrained[row] = state.grammar is not None
        self.has_penalties[row] = has_penalties(params)
        self.needs_prompt_logprobs[row] = state.needs_prompt_logprobs
        pending_row = self._last_sample_row(state)
        if state.num_pending_tokens and pending_row < 0:
            raise RuntimeError(f"request {state.req_id!r} has a token in flight from a step "
                               "before the last one; read that step's output first.")
        self.prev_sample_row[row] = pending_row if state.num_pending_tokens else -1
        if self.has_penalties[row]:
            self._init_penalty_row(row, state, pending_row)
        return row

    def remove(self, req_id: str) -> RequestState:
        """Drop ``req_id``'s row; the last row moves into it. Returns its (synced) state."""
        row = self.rows[req_id]
        state = self.states[row]
        state.num_computed_tokens = int(self.num_computed[row])
        state.num_pending_tokens = int(self.num_pending[row])
        last = len(self.states) - 1
        if row != last:
            self._swap(row, last)
        self.states.pop()
        del self.rows[req_id]
        return state

    def put_one_query_first(self, num_scheduled: np.ndarray) -> np.ndarray:
        """Swap rows so that the requests of one scheduled token come first (the attention's
        split then reads and writes their rows in place: ``one_token_prefix``); returns
        ``num_scheduled`` in the new row order. The order is a function of the step, so
        every tensor-parallel rank builds the same batch."""
        one = num_scheduled == 1
        k = int(np.count_nonzero(one))
        front = np.flatnonzero(~one[:k])  # longer chunks among the first k rows
        if front.size == 0:
            return num_scheduled
        back = k + np.flatnonzero(one[k:])  # as many one-query rows behind them
        for a, b in zip(front.tolist(), back.tolist(), strict=True):
            self._swap(a, b)
        ordered = num_scheduled.copy()
        ordered[front], ordered[back] = num_scheduled[back], num_scheduled[front]
        return ordered

    def _swap(self, a: int, b: int) -> None:
        state_a, state_b = self.states[a], self.states[b]
        self.states[a], self.states[b] = state_b, state_a
        self.rows[state_a.req_id], self.rows[state_b.req_id] = b, a
        width = int(max(self.num_known[a], self.num_known[b]))
        self.token_ids[[a, b], :width] = self.token_ids[[b, a], :width]
        for name, array in self._arrays.items():
            if name != "token_ids":
                array[[a, b]] = array[[b, a]]
        if self.prompt_mask is not None and (self.has_penalties[a] or self.has_penalties[b]):
            assert self.output_counts is not None
            for table in (self.prompt_mask, self.output_counts):
                # Row views, not index lists: no host-to-device copy (it would wait for the
                # device's queued work).
                row_a = table[a].clone()
                table[a].copy_(table[b])
                table[b].copy_(row_a)

    def clear(self) -> None:
        self.states.clear()
        self.rows.clear()
        self.last_sampled = None
        self._last_step_states = []
        self._last_step_rows = np.zeros(0, dtype=np.int64)

    def _last_sample_row(self, state: RequestState) -> int:
        """The row of ``state``'s sample in the last step, or -1."""
        for row in self._last_step_rows.tolist():
            if self._last_step_states[row] is state:
                return row
        return -1

    def _check_group_tables(self, req_id: str, group_block_ids: list[list[int]]) -> None:
        if len(group_block_ids) != self.num_groups - 1:
            raise ValueError(
                f"request {req_id!r}: the model has {self.num_groups} KV groups, so "
                f"group_block_ids must hold {self.num_groups - 1} block tables, got "
                f"{len(group_block_ids)}.")

    def update_cached(self, req_id: str, new_block_ids: list[int],
                      num_computed_tokens: int,
                      new_group_block_ids: list[list[int]] | None = None) -> None:
        row = self.rows[req_id]
        self.num_computed[row] = num_computed_tokens
        if not new_block_ids and self.num_groups == 1:
            return  # a decode step within its last block: the common case
        state = self.states[row]
        state.block_ids.extend(new_block_ids)
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(new_block_ids)] = new_block_ids
        self.num_blocks[row] = start + len(new_block_ids)
        if self.num_groups > 1:
            new_group_block_ids = new_group_block_ids or []
            self._check_group_tables(req_id, new_group_block_ids)
            for group, ids in enumerate(new_group_block_ids):
                state.group_block_ids[group].extend(ids)
                start = int(self.num_group_blocks[row, group])
                self.group_block_table[row, group, start:start + len(ids)] = ids
                self.num_group_blocks[row, group] = start + len(ids)

    def append_known_tokens(self, states: list[RequestState], token_ids: list[int]) -> None:
        """``append_known_token`` for several requests (each once) at a time."""
        rows, known = [], []
        for state, token_id in zip(states, token_ids, strict=True):
            state.token_ids.append(token_id)
            row = self.rows.get(state.req_id)
            if row is None or self.states[row] is not state:
                state.num_pending_tokens -= 1
            else:
                rows.append(row)
                known.append(token_id)
        if rows:
            index = np.array(rows, dtype=np.int64)
            self.token_ids[index, self.num_known[index]] = known
            self.num_known[index] += 1
            self.num_pending[index] -= 1

    def append_known_token(self, state: RequestState, token_id: int) -> None:
        """A pending token's id reached the host."""
        self.append_known_tokens([state], [token_id])

    def num_pending_tokens(self, state: RequestState) -> int:
        row = self.rows.get(state.req_id)
        return state.num_pending_tokens if row is None else int(self.num_pending[row])

    # ---- penalties ---------------------------------------------------------------------
    def _allocate_penalty_tables(self, capacity: int) -> None:
        mask = torch.zeros(capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(capacity, self.vocab_size, dtype=torch.int32, device=self.device)
        if self.prompt_mask is not None and self.output_counts is not None:
            mask[:self.prompt_mask.shape[0]] = self.prompt_mask
            counts[:self.output_counts.shape[0]] = self.output_counts
        self.prompt_mask, self.output_counts = mask, counts

    def _init_penalty_row(self, row: int, state: RequestState, pending_row: int) -> None:
        if self.prompt_mask is None:
            self._allocate_penalty_tables(self.capacity)
        assert self.prompt_mask is not None and self.output_counts is not None
        self.prompt_mask[row] = False
        self.output_counts[row] = 0
        prompt = torch.tensor(state.prompt_token_ids, dtype=torch.long)
        self.prompt_mask[row, prompt.to(self.device)] = True
        output = torch.tensor(state.output_token_ids, dtype=torch.long).to(self.device)
        if state.num_pending_tokens:
            assert self.last_sampled is not None
            output = torch.cat((output, self.last_sampled[pending_row:pending_row + 1]))
        self.output_counts[row].index_add_(
            0, output, torch.ones_like(output, dtype=torch.int32))

    # ---- one step ----------------------------------------------------------------------
    def prepare(self, num_scheduled: np.ndarray) -> BatchInputs:
        """Inputs of a step that computes ``num_scheduled[row]`` tokens of every row.

        Raises:
            ValueError: a chunk runs past the request's tokens or its blocks.
        """
        n = self.num_reqs
        bs = self.block_size
        starts = self.num_computed[:n].copy()
        ends = starts + num_scheduled
        num_tokens = self.num_known[:n] + self.num_pending[:n]
        num_blocks = self.num_blocks[:n]
        if self.num_groups > 1:
            num_blocks = np.minimum(num_blocks, self.num_group_blocks[:n].min(axis=1))
        bad = (num_scheduled <= 0) | (ends > num_tokens) | (ends > num_blocks * bs)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"request {self.states[row].req_id!r}: scheduled tokens [{starts[row]}, "
                f"{ends[row]}) exceed its {num_tokens[row]} known tokens or "
                f"{num_blocks[row]} blocks.")
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(num_scheduled, out=cu[1:])
        num_batch_tokens = int(cu[-1])
        req_index = np.repeat(np.arange(n), num_scheduled)
        positions = np.arange(num_batch_tokens) - np.repeat(cu[:-1] - starts, num_scheduled)
        input_ids = self.token_ids[req_index, positions]
        # Tokens whose ids are still on the device: the last step sampled them.
        pending_dst = np.flatnonzero(positions >= self.num_known[req_index])
        pending_src = self.prev_sample_row[req_index[pending_dst]]
        if pending_dst.size and ((pending_src < 0).any() or (
                positions[pending_dst] != self.num_known[req_index[pending_dst]]).any()):
            raise RuntimeError("a step needs a token sampled before the last step; read "
                               "that step's output first.")
        block_index, offsets = positions // bs, positions % bs
        slots = self.block_table[req_index, block_index].astype(np.int64) * bs + offsets
        width = int(self.num_blocks[:n].max())
        width = min(-(-width // _BLOCK_TABLE_ALIGN) * _BLOCK_TABLE_ALIGN,
                    self.max_blocks_per_req)
        arrays = {
            "input_ids": input_ids,
            "positions": positions.astype(np.int32),
            "slot_mapping": slots,
            "query_start_loc": cu.astype(np.int32),
            "seq_lens": ends.astype(np.int32),
            "block_tables": self.block_table[:n, :width],
            "logits_indices": cu[1:] - 1,
            "pending_dst": pending_dst,
            "pending_src": pending_src,
            "sample_rows": np.flatnonzero(ends == num_tokens),
            "temperature": self.temperature[:n],
            "seeds": self.seeds[:n],
            # The token being sampled is at this position of the output.
            "offsets": num_tokens - self.num_prompt[:n],
            **{name: self._arrays[name][:n] for name, _, _ in _PARAM_ARRAYS},
        }
        for group in range(1, self.num_groups):
            table = self.group_block_table[:, group - 1]
            arrays[f"slot_mapping_{group}"] = (
                table[req_index, block_index].astype(np.int64) * bs + offsets)
            arrays[f"block_tables_{group}"] = table[:n, :width]
        dev = self.staging.send(arrays)
        input_ids_dev = dev["input_ids"]
        if pending_dst.size:
            assert self.last_sampled is not None
            ops.scatter_sampled(input_ids_dev, dev["pending_dst"], dev["pending_src"],
                                self.last_sampled)
        one_token = num_scheduled == 1
        num_one_token = int(np.count_nonzero(one_token))
        one_token_prefix = num_one_token if one_token[:num_one_token].all() else 0
        metadata = AttentionMetadata(
            slot_mapping=dev["slot_mapping"], query_start_loc=dev["query_start_loc"],
            seq_lens=dev["seq_lens"], block_tables=dev["block_tables"],
            max_query_len=int(num_scheduled.max()), max_seq_len=int(ends.max()),
            num_one_token=num_one_token, one_token_prefix=one_token_prefix)
        if self.num_groups > 1:
            metadata.groups = [metadata] + [
                dataclasses.replace(metadata, slot_mapping=dev[f"slot_mapping_{group}"],
                                    block_tables=dev[f"block_tables_{group}"])
                for group in range(1, self.num_groups)]
        return BatchInputs(input_ids=input_ids_dev, positions=dev["positions"],
                           attn_metadata=metadata, starts=starts, num_tokens=num_scheduled,
                           logits_indices=dev["logits_indices"],
                           is_sampling=ends == num_tokens, sampling=dev)

    def record_samples(self, sampled: torch.Tensor, inputs: BatchInputs) -> None:
        """Note the step's samples (``sampled[row]``, real where ``inputs.is_sampling``):
        they are pending tokens until the host reads them, and the next step's inputs."""
        n = self.num_reqs
        rows = np.flatnonzero(inputs.is_sampling)
        self.num_pending[rows] += 1
        self.prev_sample_row[:n] = -1
        self.prev_sample_row[rows] = rows
        self.last_sampled = sampled
        self._last_step_states = self.states.copy()
        self._last_step_rows = rows
        if self.output_counts is not None and self.has_penalties[rows].any():
            index = inputs.sampling["sample_rows"]
            self.output_counts.index_put_(
                (index, sampled[index]), torch.ones(rows.size, dtype=torch.int32,
                                                    device=self.device), accumulate=True)

    def sampling_metadata(self, inputs: BatchInputs,
                          eos_token_id: int | None) -> SamplingMetadata:
        """The sampler's view of this step's rows (every row samples; the runner keeps
        the samples of ``inputs.is_sampling`` rows only)."""
        n = self.num_reqs
        dev = inputs.sampling
        random = self.temperature[:n] > 0
        meta = SamplingMetadata(
            num_rows=n, vocab_size=self.vocab_size, all_greedy=not random.any(),
            temperature=dev["temperature"], top_k=dev["top_k"], top_p=dev["top_p"],
            min_p=dev["min_p"], needs_filter=bool(self.is_filtered[:n].any()),
            seeds=dev["seeds"], offsets=dev["offsets"],
            no_top_k=not (random & (self._arrays["top_k"][:n] > 0)).any(),
            no_top_p=not (random & (self._arrays["top_p"][:n] < 1.0)).any())
        if self.has_penalties[:n].any():
            assert self.prompt_mask is not None and self.output_counts is not None
            meta.presence_penalty = dev["presence_penalty"]
            meta.frequency_penalty = dev["frequency_penalty"]
            meta.repetition_penalty = dev["repetition_penalty"]
            meta.prompt_mask = self.prompt_mask[:n]
            meta.output_counts = self.output_counts[:n]
        masked = np.flatnonzero(self.is_masked[:n]).tolist()
        if masked:
            states = [self.states[r] for r in masked]
            params = [s.sampling_params for s in states]
            num_output = (self.num_known + self.num_pending - self.num_prompt)[masked]
            meta.set_masks(masked, params, num_output.tolist(), [eos_token_id] * len(masked),
                           self.device)
            with_processors = [k for k, p in enumerate(params) if p.logits_processors]
            if with_processors:
                meta.set_processors([masked[k] for k in with_processors],
                                    [params[k] for k in with_processors],
                                    [states[k].prompt_token_ids for k in with_processors],
                                    [states[k].output_token_ids for k in with_processors],
                                    self.device)
        num_logprobs = self.num_logprobs[:n]
        if (num_logprobs >= 0).any():
            meta.num_logprobs = [None if k < 0 else k for k in num_logprobs.tolist()]
            meta.max_num_logprobs = int(num_logprobs.max())
        return meta

    def constrained_rows(self, inputs: BatchInputs) -> list[int]:
        """Rows whose grammar masks this step's sample (their chunk reaches the end)."""
        n = self.num_reqs
        return np.flatnonzero(self.is_constrained[:n] & inputs.is_sampling).tolist()

    def processor_rows_have_pending_tokens(self) -> bool:
        """True if a row whose processors read its token ids has ids still on the device."""
        n = self.num_reqs
        rows = np.flatnonzero(self.is_masked[:n] & (self.num_pending[:n] > 0)).tolist()
        return any(self.states[r].sampling_params.logits_processors for r in rows)
