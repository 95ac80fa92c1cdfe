"""Tiny random-weight HF models of every supported architecture, saved with save_pretrained.

Weights are drawn with a larger spread than HF's init (and biases / norm weights are made
non-trivial) so greedy decoding has clear winners and every tensor's loading matters.
"""

from __future__ import annotations

import os

import torch

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)

# arch -> (config class name, config overrides)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    # Llama 3.1 rope scaling with a short original context so the scaling changes frequencies.
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # head_dim deliberately differs from hidden_size // num_attention_heads.
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "opt": ("OPTConfig", dict(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256,
                              word_embed_proj_dim=64, do_layer_norm_before=True,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)),
    # OPT-350m layout: post-norm and project_in/project_out.
    "opt-350m": ("OPTConfig", dict(vocab_size=320, hidden_size=64, ffn_dim=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=256, word_embed_proj_dim=32,
                                   do_layer_norm_before=False, bos_token_id=0,
                                   eos_token_id=1, pad_token_id=1)),
}


def make_tiny_model(arch: str, path) -> str:
    """Build a tiny random fp32 model of ``arch`` (a key of TINY_ARCHS) and save it.

    Args:
        arch: e.g. ``"llama"``, ``"llama3"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"opt"``.
        path: target directory (created).
    Returns:
        ``str(path)``.
    """
    import transformers

    config_name, overrides = TINY_ARCHS[arch]
    kwargs = overrides if config_name == "OPTConfig" else {**_COMMON, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return str(path)
