"""The simulated worker's step time: a linear cost model of one model step.

    step = fixed + prefill_per_token * prefill tokens + decode_per_seq * decoding requests
           + context_per_token * context tokens (KV read by every scheduled request)

``LLAMA3_8B_H100`` is fitted to the GPU figures of docs/performance.md (random:llama3-8b,
bf16, one NVIDIA H100 80GB HBM3, in-process, CUDA graphs; no H200 figures were recorded):

- fixed + decode_per_seq = 6.95 ms: the batch-1 decode TPOT (128-token prompts, so the
  context term is ~0.01 ms there);
- fixed + 64 * decode_per_seq + context = ~15 ms: a batch-64 decode step ("weight-bandwidth
  bound, ~15 ms/step"), whose 64 contexts of ~500 tokens read 32k tokens of KV;
- context_per_token: the KV bytes of one token (32 layers x 2 x 8 heads x 128 x 2 B =
  128 KiB) at the paged-decode kernel's 2,900 GB/s;
- prefill_per_token: fitted (``fit_prefill``) so the simulator, running the real scheduler
  core on the same seeded dataset, takes the measured 5.47 s for the throughput row
  (64 prompts, input 128:512, output 128:256, 64 sequences, 8,192 tokens per step: 11.7
  req/s). It lands above the compute bound (16 GFLOP/token at 761 TFLOP/s is 0.021 ms):
  the same run's GPU idled between steps (host overheads), which the fit folds in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    fixed_ms: float
    prefill_ms_per_token: float
    decode_ms_per_seq: float
    context_ms_per_token: float

    def step_s(self, num_prefill_tokens: int, num_decode_seqs: int,
               num_context_tokens: int) -> float:
        """Seconds one step takes."""
        return (self.fixed_ms + self.prefill_ms_per_token * num_prefill_tokens
                + self.decode_ms_per_seq * num_decode_seqs
                + self.context_ms_per_token * num_context_tokens) / 1000.0


# KV read per context token: 131,072 bytes at 2.9e12 bytes/s, in ms.
_CONTEXT_MS = 131_072 / 2.9e12 * 1000
# From the two decode anchors above: 63 more sequences and ~32k tokens of context cost
# 15 - 6.95 ms.
_DECODE_MS = (15.0 - 6.95 - 64 * 500 * _CONTEXT_MS) / 63
LLAMA3_8B_H100 = CostModel(fixed_ms=6.95 - _DECODE_MS, prefill_ms_per_token=0.1045,
                           decode_ms_per_seq=_DECODE_MS, context_ms_per_token=_CONTEXT_MS)

# The measured throughput row the prefill cost is fitted to.
FIT_TARGET = {"num_prompts": 64, "input_len_range": (128, 512),
              "output_len_range": (128, 256), "max_num_seqs": 64,
              "max_num_batched_tokens": 8192, "wall_s": 64 / 11.7}
