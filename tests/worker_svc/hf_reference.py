"""transformers references for parity tests."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def hf_model(model_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {}
    if getattr(AutoConfig.from_pretrained(model_dir), "attn_logit_softcapping", None):
        # Only eager attention applies the soft-cap: some transformers releases default
        # Gemma 2 to SDPA, which skips it.
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 **kwargs).eval()
    # Parity runs a fixed number of steps; EOS must not stop the reference early.
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int
              ) -> tuple[list[int], torch.Tensor]:
    """Greedy ``generate``: ``(new token ids, logits [max_new_tokens, vocab] float32)``."""
    model = hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float()


def hf_prompt_logits(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """Logits ``[len(prompt), vocab]`` of one full forward."""
    with torch.no_grad():
        return hf_model(model_dir)(torch.tensor([prompt])).logits[0].float()
