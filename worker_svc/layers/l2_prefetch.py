"""The next projections' weights fetched into L2 while a small decode step's attention runs.

In a decode step of a few rows each projection streams its weight from device memory at
close to the copy bandwidth, and the kernels between them read almost nothing: after the
q/k/v projection come rotary and the KV write, decode attention over the requests' keys
(a few megabytes for short contexts), its split merge and a norm, ~10 us a layer on an
H200 in which the DRAM is idle. ``WeightPrefetch`` forks a side stream right after each
layer's q/k/v projection and asks L2 for that layer's o projection weight, then the head
of its gate/up weight (``kernels.l2_prefetch``), up to a budget of bytes; the main stream
goes on, and the o and gate/up GEMVs find those bytes in L2. The side stream joins the
main one at the end of the forward, so a CUDA graph captures it whole. Results are
unchanged (a cache hint); what it moves is time.

A second point, after the o projection, can ask for the head of the next layer's q/k/v
weight (``GRIDLLM_L2_PREFETCH_NEXT_MB``, default none): it streams beside the gate/up and
down GEMVs, whose reads leave part of the DRAM's time unused at their starts and ends,
and has to stay in L2 (``evict_last``) past their 175 MB of streaming reads (marked
``evict_first``) to be of use.

It runs only in decode-only steps of at most ``MAX_ROWS`` rows (where reading the weights
is the step) that a CUDA graph captures (an eager step's pace is the host's, which leaves
the DRAM idle anyway, and the fork and launches would cost it ~20 us a layer), and on the
device it fetches nothing when the step's requests hold more than ``max_kv_tokens``
tokens (attention then streams as many cache bytes as the prefetch would, and would evict
it): by default the budget's worth of one layer's KV. Its kernel is built when it is
installed (``warm_up``), before any capture.

Off by default: at its default budget it made a batch-1 FP8 decode step of Llama-3-8B
3.4% slower on an H100 (docs/performance.md); its budgets and plans are still to be
swept on an H200 (``benchmarks/l2_prefetch.py``). ``GRIDLLM_L2_PREFETCH=1`` before the
worker starts turns it on (Hopper and later), ``GRIDLLM_L2_PREFETCH_MB`` sets the budget a layer
after q/k/v (default half the L2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from kernels.l2_prefetch import CHUNK, GATE_ROWS, l2_prefetch, span_bytes, supported
from worker_svc.layers.attention import AttentionMetadata

# Decode steps of up to this many rows prefetch (at most kernels.l2_prefetch.GATE_ROWS).
MAX_ROWS = 8
# The default budget a layer, as a fraction of the device's L2.
_BUDGET_FRACTION = 0.5


def enabled_from_environment() -> bool:
    """``GRIDLLM_L2_PREFETCH``: 1 on, 0 or unset off."""
    value = os.environ.get("GRIDLLM_L2_PREFETCH", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GRIDLLM_L2_PREFETCH must be 0 or 1, got {value!r}.")
    return value == "1"


def _mib_from_environment(name: str, default: int, allow_zero: bool = False) -> int:
    """Bytes from the environment variable ``name`` in MiB (a positive number, or 0 where
    ``allow_zero``), ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    low_ok = mib >= 0 if allow_zero else mib > 0
    if not (low_ok and math.isfinite(mib)):
        kind = "a number >= 0" if allow_zero else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}.")
    return int(mib * (1 << 20))


def budget_bytes(l2_bytes: int) -> int:
    """Bytes prefetched a layer after its q/k/v projection: ``GRIDLLM_L2_PREFETCH_MB`` (MiB,
    a positive number), else ``_BUDGET_FRACTION`` of the device's ``l2_bytes``."""
    return _mib_from_environment("GRIDLLM_L2_PREFETCH_MB", int(l2_bytes * _BUDGET_FRACTION))


def next_budget_bytes() -> int:
    """Bytes of the next layer's q/k/v weight prefetched after a layer's o projection:
    ``GRIDLLM_L2_PREFETCH_NEXT_MB`` (MiB, >= 0), default 0 (none)."""
    return _mib_from_environment("GRIDLLM_L2_PREFETCH_NEXT_MB", 0, allow_zero=True)


def layer_spans(weights: Sequence[Sequence[torch.Tensor]], budget: int,
                chunk: int = CHUNK) -> list[list[torch.Tensor]]:
    """For each layer's weights in the order they are read, the byte spans to prefetch:
    whole tensors, then the head of the next, until ``budget`` bytes (``uint8`` views of
    whole ``chunk``s, ``kernels.l2_prefetch.span_bytes``)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")
    plan = []
    for tensors in weights:
        spans, left = [], budget
        for t in tensors:
            span = span_bytes(t, left, chunk)
            if span.numel():
                spans.append(span)
                left -= span.numel()
        plan.append(spans)
    return plan


class WeightPrefetch:
    """Issues each layer's spans after its q/k/v projection (``after_qkv``) and after its o
    projection (``after_o``), and joins the side stream at the end of the forward
    (``join``).

    Args:
        spans: per layer, ``layer_spans``' (after q/k/v).
        max_kv_tokens: the step's gate (see the module docstring).
        max_rows: decode steps of up to this many rows prefetch.
        launch: ``l2_prefetch``'s signature (the spans, the step's ``seq_lens``, the gate).
        stream: the side stream (None: launch on the current stream, in order).
        spans_after_o: per layer, the spans after its o projection (default none).
        capturing: whether the step is being captured into a CUDA graph (default: torch's
            answer with a side stream; always without one, as CPU tests launch).
    """

    def __init__(self, spans: list[list[torch.Tensor]], max_kv_tokens: int,
                 max_rows: int = MAX_ROWS, launch: Callable = l2_prefetch,
                 stream: torch.cuda.Stream | None = None,
                 spans_after_o: list[list[torch.Tensor]] | None = None,
                 capturing: Callable[[], bool] | None = None):
        if not 1 <= max_rows <= GATE_ROWS:
            raise ValueError(f"max_rows must be in [1, {GATE_ROWS}], got {max_rows}.")
        if spans_after_o is not None and len(spans_after_o) != len(spans):
            raise ValueError(f"spans_after_o must have one entry per layer ({len(spans)}), "
                             f"got {len(spans_after_o)}.")
        self.spans = spans
        self.spans_after_o = spans_after_o or [[] for _ in spans]
        self.max_kv_tokens = max_kv_tokens
        self.max_rows = max_rows
        self.launch = launch
        self.stream = stream
        if capturing is None:
            capturing = (torch.cuda.is_current_stream_capturing if stream is not None
                         else lambda: True)
        self._capturing = capturing
        self._forked = False

    @property
    def num_bytes(self) -> int:
        """Bytes prefetched in a step (all layers, both points)."""
        return sum(span.numel() for plan in (self.spans, self.spans_after_o)
                   for spans in plan for span in spans)

    def applies(self, num_tokens: int, metadata: AttentionMetadata) -> bool:
        """Whether a step of ``num_tokens`` rows prefetches: decode-only, few rows, being
        captured into a CUDA graph (and ``seq_lens`` as the gate reads it: int32)."""
        return (0 < num_tokens <= self.max_rows and metadata.is_decode_only
                and metadata.seq_lens.dtype == torch.int32 and self._capturing())

    def warm_up(self) -> None:
        """One prefetch on the current stream, so the kernel is built before a capture."""
        span = next((s for plan in (self.spans, self.spans_after_o) for spans in plan
                     for s in spans), None)
        if span is not None:
            self.launch(span, torch.zeros(1, dtype=torch.int32, device=span.device),
                        self.max_kv_tokens)

    def after_qkv(self, layer: int, num_tokens: int, metadata: AttentionMetadata) -> None:
        """Layer ``layer``'s q/k/v projection is on the stream: fetch its spans."""
        self._issue(self.spans[layer], num_tokens, metadata)

    def after_o(self, layer: int, num_tokens: int, metadata: AttentionMetadata) -> None:
        """Layer ``layer``'s o projection is on the stream: fetch its ``spans_after_o``."""
        self._issue(self.spans_after_o[layer], num_tokens, metadata)

    def _issue(self, spans: list[torch.Tensor], num_tokens: int,
               metadata: AttentionMetadata) -> None:
        if not spans or not self.applies(num_tokens, metadata):
            return
        if self.stream is None:
            for span in spans:
                self.launch(span, metadata.seq_lens, self.max_kv_tokens)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for span in spans:
                self.launch(span, metadata.seq_lens, self.max_kv_tokens)
        self._forked = True

    def join(self) -> None:
        """The forward's end: the main stream waits for the side stream (a graph capture
        must end joined)."""
        if self._forked:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self._forked = False


def _weight(module: nn.Module | None) -> list[torch.Tensor]:
    """``module``'s weight as a one-item list where it is a contiguous tensor (what a span
    can be cut from), else empty."""
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) and weight.is_contiguous() else []


def decoder_weights(model: nn.Module) -> list[list[torch.Tensor]] | None:
    """Per decoder layer, the weights read after attention: the o projection's, then the
    gate/up projection's; None for a model without the Llama family's hooks."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "weight_prefetch"):
        return None
    return [_weight(getattr(layer.self_attn, "o_proj", None))
            + _weight(getattr(layer.mlp, "gate_up_proj", None)) for layer in inner.layers]


def next_qkv_spans(model: nn.Module, budget: int) -> list[list[torch.Tensor]]:
    """Per decoder layer, the head of the next layer's q/k/v weight (``budget`` bytes;
    none after the last layer)."""
    layers = model.model.layers
    return layer_spans([_weight(nxt.self_attn.qkv_proj) for nxt in layers[1:]] + [[]],
                       budget)


def install(model: nn.Module, device: torch.device, kv_bytes_per_token: int,
            stream: torch.cuda.Stream | None = None,
            launch: Callable = l2_prefetch) -> WeightPrefetch | None:
    """Hooks a ``WeightPrefetch`` into a Llama-family model where ``GRIDLLM_L2_PREFETCH=1``
    and the device can prefetch (``kernels.l2_prefetch.supported``); returns it, or None.
    ``kv_bytes_per_token``: one layer's KV-cache bytes a token (keys and values), which
    with the budget sets the gate. ``stream``: the side stream (default a new one on
    ``device``); ``launch``: the prefetch (tests on the CPU pass their own)."""
    if not enabled_from_environment():
        return None
    if launch is l2_prefetch and not supported(device):
        return None
    weights = decoder_weights(model)
    if weights is None:
        return None
    l2 = (torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda"
          else 0)
    budget = budget_bytes(l2)
    if stream is None and device.type == "cuda":
        stream = torch.cuda.Stream(device)
    prefetch = WeightPrefetch(layer_spans(weights, budget),
                              budget // max(kv_bytes_per_token, 1), launch=launch,
                              stream=stream,
                              spans_after_o=next_qkv_spans(model, next_budget_bytes()))
    if stream is not None:
        prefetch.warm_up()
    model.model.weight_prefetch = prefetch
    for layer in model.model.layers:
        layer.self_attn.weight_prefetch = prefetch
    return prefetch
