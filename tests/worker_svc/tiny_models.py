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
# Variants only the worker tests sweep (the LLM tests sweep TINY_ARCHS; the windowed ones
# run end to end in tests/gridllm/test_sliding_window_parity.py).
EXTRA_ARCHS = {
    # Qwen2 with a window on layer 1 only (layer_types from max_window_layers).
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6,
                                          max_window_layers=1)),
    # Llama with biases on every projection (attention_bias, mlp_bias): the row-parallel
    # o and down projections carry one too.
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    # Mistral with a window of 12 on every layer.
    "mistral-w12": ("MistralConfig", dict(sliding_window=12)),
    # Gemma 2: local (window 6) and global layers interleaved; head_dim differs from
    # hidden_size // heads, query_pre_attn_scalar from head_dim, and the soft-caps are small
    # enough to bite, so each one changes the outputs.
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                                    sliding_window=6, attn_logit_softcapping=4.0,
                                    final_logit_softcapping=8.0, tie_word_embeddings=True)),
    # Gemma 3 text: local, global, local; q/k norms; linear rope scaling on global layers.
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, head_dim=32,
                                        query_pre_attn_scalar=24, sliding_window=6,
                                        sliding_window_pattern=2, tie_word_embeddings=True,
                                        rope_scaling=dict(rope_type="linear", factor=4.0))),
}
ALL_TINY_ARCHS = {**TINY_ARCHS, **EXTRA_ARCHS}


def make_tiny_model(arch: str, path) -> str:
    """Build a tiny random fp32 model of ``arch`` and save it.

    Args:
        arch: a key of ``ALL_TINY_ARCHS`` (``"llama"``, ``"mistral"``, ``"gemma2"`` ...).
        path: target directory (created).
    Returns:
        ``str(path)``.
    """
    import transformers

    config_name, overrides = ALL_TINY_ARCHS[arch]
    kwargs = overrides if config_name == "OPTConfig" else {**_COMMON, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma's norms scale by 1 + weight: the stored weight is an offset.
                offset = 0.0 if config.model_type.startswith("gemma") else 1.0
                param.copy_(offset + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return str(path)


def _llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf interleaves the two rotary halves of each q/k head.
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def make_tiny_gguf(model_dir: str, path) -> str:
    """Write the tiny ``llama`` model at ``model_dir`` as an f32 GGUF file, the way llama.cpp
    converts it (tensor names, metadata and the q/k row permutation).

    Returns:
        ``str(path)``.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for name, tensor in tensors.items():
        if ".q_proj." in name:
            tensor = _llama_cpp_permute(tensor, config.num_attention_heads)
        elif ".k_proj." in name:
            tensor = _llama_cpp_permute(tensor, config.num_key_value_heads)
        writer.add_tensor(names[name], tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
