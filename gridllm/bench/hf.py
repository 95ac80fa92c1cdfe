"""The ``transformers`` baseline: ``generate`` on the benchmark's prompts in static batches.

How it is made comparable with gridllm (which runs every request to exactly its own
``output_len`` with ``ignore_eos``):

- the prompts are the same token ids, in the dataset's order, cut into consecutive static
  batches of ``batch_size`` (gridllm's ``max_num_seqs`` unless given);
- each batch is left-padded (with an attention mask) and generated greedily with
  ``min_new_tokens = max_new_tokens = the batch's longest output_len`` and EOS disabled, so
  every row generates exactly that many tokens;
- throughput counts only the tokens that were asked for: ``sum(output_len)`` output tokens
  and ``sum(input_len)`` prompt tokens, the same totals gridllm is credited with. Tokens a
  row generates past its own ``output_len`` (the price of static batching) are reported
  separately as ``generated_tokens`` but not counted as useful output.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from gridllm.bench.datasets import BenchRequest

logger = logging.getLogger(__name__)


def load_hf_model(model: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A transformers causal LM for ``model`` (a ``random:`` preset, preset name, HF
    directory or GGUF file) on ``device`` in ``dtype``.

    Random presets are initialised by transformers itself, on the device (different
    random values than gridllm's: the comparison is of speed, not of tokens).
    """
    from transformers import AutoModelForCausalLM

    from gridllm.common.random_presets import is_random_model, random_model_config
    from worker_svc.loader import resolve_model_path

    if is_random_model(model):
        torch.manual_seed(seed)
        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(random_model_config(model), dtype=dtype)
    else:
        import os

        path = resolve_model_path(model)
        if os.path.isfile(path) and path.endswith(".gguf"):
            hf_model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        hf_model = hf_model.to(device)  # type: ignore[arg-type]
    hf_model.eval()
    return hf_model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_batch(hf_model, batch: Sequence[BenchRequest], device: torch.device,
                   pad_token_id: int = 0) -> int:
    """Generate one static batch; returns the number of tokens generated (all rows)."""
    max_input = max(r.input_len for r in batch)
    max_new = max(r.output_len for r in batch)
    input_ids = torch.full((len(batch), max_input), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), max_input), dtype=torch.long)
    for row, request in enumerate(batch):
        input_ids[row, max_input - request.input_len:] = torch.tensor(request.prompt_token_ids)
        attention_mask[row, max_input - request.input_len:] = 1
    out = hf_model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                            pad_token_id=pad_token_id, eos_token_id=None)
    num_new = out.shape[1] - max_input
    if num_new != max_new:
        raise RuntimeError(f"transformers generated {num_new} tokens per row, expected {max_new}.")
    return num_new * len(batch)


def run_hf(model: str, requests: Sequence[BenchRequest], batch_size: int, dtype: torch.dtype,
           device: torch.device, *, seed: int = 0, use_tqdm: bool = True,
           hf_model: Any = None) -> dict[str, Any]:
    """Time transformers ``generate`` over ``requests`` (see the module docstring).

    Args:
        model: model name as given to gridllm.
        requests: the benchmark's requests, in order.
        batch_size: rows per static batch.
        dtype, device: where the model runs.
        seed: weight seed for random presets.
        use_tqdm: progress bar over batches.
        hf_model: an already loaded model (tests); loaded (and freed afterwards) if None.
    Returns:
        ``elapsed_s``, the token totals and the throughputs (useful tokens only).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"hf_batch_size must be at least 1, got {batch_size}.")
    owns_model = hf_model is None
    if owns_model:
        hf_model = load_hf_model(model, dtype, device, seed)
    pad_token_id = getattr(hf_model.generation_config, "pad_token_id", None) or 0
    # A short warm-up so one-time CUDA/cuBLAS set-up is not charged to the first batch.
    generate_batch(hf_model, [BenchRequest(requests[0].prompt_token_ids[:8], 2)], device,
                   pad_token_id)
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    generated = 0
    _synchronize(device)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="transformers generate (batches)", disable=not use_tqdm,
                      dynamic_ncols=True):
        generated += generate_batch(hf_model, batch, device, pad_token_id)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    if owns_model:
        del hf_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    input_tokens = sum(r.input_len for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    return {
        "backend": "transformers",
        "batch_size": batch_size,
        "num_requests": len(requests),
        "elapsed_s": elapsed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "generated_tokens": generated,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (input_tokens + output_tokens) / elapsed,
    }
