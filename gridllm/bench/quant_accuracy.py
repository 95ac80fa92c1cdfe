"""How much a quantized setting (FP8 weights, an FP8 KV cache) changes a model's next-token
predictions, against transformers in float32 and transformers' own bfloat16 difference.

The measure, on a fixed prompt set: transformers fp32 generates a greedy continuation of
each prompt (the reference sequence); a variant then predicts each next token along that
sequence, teacher-forced through gridllm's model forward over a paged cache (one step
prefills every prompt, then one decode step per token, so both attention paths read what
was cached). Per variant (``measure``):

- top-1 agreement: the fraction of positions whose argmax is fp32's;
- max logit error: the largest |logit - fp32 logit| over positions and vocabulary;
- mean KL divergence of the variant's next-token distribution from fp32's (less sensitive
  than the other two to the few positions whose top two logits nearly tie).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from worker_svc.layers.attention import AttentionMetadata

# Tokens per block of the teacher-forcing cache.
BLOCK_SIZE = 16


@dataclass
class Case:
    """One prompt's reference: ``seq`` = prompt + fp32 greedy continuation (token ids),
    and the fp32 and bf16 logits at the positions predicting the continuation."""

    seq: torch.Tensor
    prompt_len: int
    fp32_logits: torch.Tensor
    bf16_logits: torch.Tensor


def reference_cases(model_dir: str, prompts: list[list[int]], num_new: int,
                    device: str | torch.device = "cpu") -> list[Case]:
    """Per prompt (token ids): transformers fp32's greedy ``num_new``-token sequence and
    the logits fp32 and bf16 give along it (run on ``device``, returned on the CPU)."""
    from transformers import AutoModelForCausalLM

    cases = []
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        for ids in prompts:
            prompt = torch.tensor([ids], device=device)
            seq = fp32.generate(prompt, max_new_tokens=num_new, min_new_tokens=num_new,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones_like(prompt))[0]
            rows = slice(len(ids) - 1, len(seq) - 1)  # the positions predicting new tokens
            cases.append(Case(seq.cpu(), len(ids), fp32(seq[None]).logits[0, rows].float().cpu(),
                              torch.empty(0)))
    del fp32
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        for case in cases:
            rows = slice(case.prompt_len - 1, len(case.seq) - 1)
            case.bf16_logits = bf16(case.seq[None].to(device)).logits[0, rows].float().cpu()
    return cases


def text_cases(model_dir: str, texts: list[str], num_new: int) -> list[Case]:
    """``reference_cases`` of ``texts``, tokenized by the model's own tokenizer (CPU)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return reference_cases(model_dir, [tokenizer(text).input_ids for text in texts], num_new)


def teacher_forced_logits(model, cases: list[Case], kv_dtype: torch.dtype, num_new: int
                          ) -> list[torch.Tensor]:
    """Per case, ``model``'s logits predicting the ``num_new`` tokens after the prompt (the
    last one predicted from ``seq[prompt_len + num_new - 1]``; float32, on the CPU): one
    step prefills every prompt, then each step decodes one token of every sequence, over
    a paged cache of ``kv_dtype`` on the model's device (left on ``model.last_caches``)."""
    device = next(model.parameters()).device
    config = model.config
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = max(-(-len(case.seq) // BLOCK_SIZE) for case in cases)
    shape = (width * len(cases), BLOCK_SIZE, num_kv_heads, head_dim)
    caches = [(torch.zeros(shape, dtype=kv_dtype, device=device),
               torch.zeros(shape, dtype=kv_dtype, device=device))
              for _ in range(config.num_hidden_layers)]
    tables = torch.arange(width * len(cases), dtype=torch.int32).view(len(cases), width)
    # Step 0: every prompt whole; step j > 0: token prompt_len + j - 1 of every sequence.
    steps = [[(0, case.prompt_len) for case in cases]]
    steps += [[(case.prompt_len + j - 1, case.prompt_len + j) for case in cases]
              for j in range(1, num_new)]
    logits: list[list[torch.Tensor]] = [[] for _ in cases]
    with torch.inference_mode():
        for spans in steps:
            positions = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in spans])
            slots = torch.cat([tables[i, torch.arange(a, b) // BLOCK_SIZE].long() * BLOCK_SIZE
                               + torch.arange(a, b) % BLOCK_SIZE
                               for i, (a, b) in enumerate(spans)])
            ids = torch.cat([case.seq[a:b] for case, (a, b) in zip(cases, spans, strict=True)])
            lens = torch.tensor([b - a for a, b in spans])
            starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
            metadata = AttentionMetadata(
                slot_mapping=slots.to(device), query_start_loc=starts.int().to(device),
                seq_lens=torch.tensor([b for _, b in spans], dtype=torch.int32, device=device),
                block_tables=tables.to(device), max_query_len=int(lens.max()),
                max_seq_len=max(b for _, b in spans))
            hidden = model(ids.int().to(device), positions.to(device), caches, metadata)
            last = model.compute_logits(hidden[(starts[1:] - 1).to(device)]).float().cpu()
            for i in range(len(cases)):
                logits[i].append(last[i:i + 1])
    model.last_caches = caches
    return [torch.cat(rows) for rows in logits]


def measure(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
    """``(mean top-1 agreement, max |logit error|, mean KL(reference || logits))`` over
    ``(logits, reference logits)`` pairs."""
    agree = torch.cat([(out.argmax(-1) == ref.argmax(-1)).float() for out, ref in pairs])
    error = max(float((out - ref).abs().max()) for out, ref in pairs)
    kl = torch.cat([torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1),
                                               log_target=True, reduction="none").sum(-1)
                    for out, ref in pairs])
    return float(agree.mean()), error, float(kl.mean())


def measure_model(model, cases: list[Case], kv_dtype: torch.dtype, num_new: int
                  ) -> tuple[float, float, float]:
    """``measure`` of ``model``'s teacher-forced logits (``teacher_forced_logits``)
    against fp32's."""
    logits = teacher_forced_logits(model, cases, kv_dtype, num_new)
    return measure([(out, case.fp32_logits) for out, case in zip(logits, cases, strict=True)])


def measure_bf16(cases: list[Case]) -> tuple[float, float, float]:
    """``measure`` of transformers bf16's logits against fp32's."""
    return measure([(case.bf16_logits, case.fp32_logits) for case in cases])


def result_row(variant: str, measured: tuple[float, float, float]) -> dict:
    """A printed and JSON row: ``variant`` and ``measure``'s three figures by name."""
    agree, error, kl = measured
    return {"variant": variant, "top1_agreement": agree, "max_logit_error": error,
            "mean_kl": kl}


def format_rows(rows: list[dict]) -> str:
    """``result_row`` rows as a table."""
    from gridllm.bench.report import format_table

    return format_table([[r["variant"], f"{r['top1_agreement']:.4f}",
                          f"{r['max_logit_error']:.3f}", f"{r['mean_kl']:.5f}"] for r in rows],
                        ["variant", "top-1 agreement", "max logit error", "mean KL"])


def kv_amax(model, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """Per layer, the largest |key| and |value| ``model`` writes over ``prompts`` (one
    prefill, a float32 cache): what calibrated KV-cache scales are made of."""
    cases = [Case(torch.tensor(ids), len(ids), torch.empty(0), torch.empty(0))
             for ids in prompts]
    teacher_forced_logits(model, cases, torch.float32, num_new=1)
    return [(float(k.abs().max()), float(v.abs().max())) for k, v in model.last_caches]


def write_rescaled_kv_checkpoint(source: str, target: str, factor: float) -> str:
    """Copy ``source`` (a Llama-family HF directory of one safetensors file, no q/k norms)
    to ``target`` with keys and values ``factor`` times larger and the same function: the
    k and v projections times ``factor``, the q and o projections over it (with a power of
    two every product is exactly the original's). Returns ``target``."""
    shutil.copytree(source, target)
    path = os.path.join(target, "model.safetensors")
    state = load_file(path)
    for name in state:
        if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            state[name] = state[name] * factor
        elif name.endswith(("q_proj.weight", "o_proj.weight", "q_proj.bias")):
            state[name] = state[name] / factor
    save_file(state, path)
    return target
