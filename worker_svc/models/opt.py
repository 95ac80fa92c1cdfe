"""OPT (facebook/opt-125m family): learned positions (offset 2), LayerNorm, biases,
pre- or post-norm (``do_layer_norm_before``), optional project_in/out.

Built under a tensor-parallel group (worker_svc/parallel) the model is Megatron-sharded:
q/k/v and fc1 column-parallel, out_proj and fc2 row-parallel, the token embedding and LM head
split over the vocabulary; positions, norms and project_in/out are replicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from worker_svc.layers.attention import AttentionBackend, AttentionMetadata
from worker_svc.layers.layers import get_activation
from worker_svc.models.weights import check_all_loaded, load_named_weights
from worker_svc.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from worker_svc.parallel.sharding import even_part
from worker_svc.parallel.state import current

KVCache = tuple[torch.Tensor, torch.Tensor]
# OPT's position table starts two rows in (a fairseq padding legacy).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    # This layer's (k_scale, v_scale) for an FP8 KV cache (calculate_kv_scales); None: the
    # backend's.
    kv_scales: tuple[float, float] | None = None

    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        tp = current()
        size = config.hidden_size
        self.head_dim = size // config.num_attention_heads
        # This rank's heads (all of them on a single device).
        self.num_heads = config.num_attention_heads // tp.world_size
        self.hidden_size = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        bias = getattr(config, "enable_bias", True)
        part = even_part(size, tp.rank, tp.world_size)
        self.qkv_proj = ColumnParallelLinear(size, [part, part, part], bias=bias)
        self.out_proj = RowParallelLinear(size, size, bias=bias)
        self.backend = backend

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        shape = (num_tokens, self.num_heads, self.head_dim)
        q, k, v = (t.view(shape) for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], attn_metadata, self.scale,
                                   kv_scales=self.kv_scales)
        return self.out_proj(out.reshape(num_tokens, self.hidden_size))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        bias = getattr(config, "enable_bias", True)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, backend)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear.merged(config.hidden_size, [config.ffn_dim], bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=bias)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.act = get_activation(config.activation_function)

    def forward(self, hidden, kv_cache, attn_metadata):
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, kv_cache, attn_metadata)
        if not self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.act(self.fc1(hidden)))
        if not self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        embed_dim = config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET,
                                            config.hidden_size)
        has_proj = embed_dim != config.hidden_size
        self.project_in = (nn.Linear(embed_dim, config.hidden_size, bias=False)
                           if has_proj else None)
        self.project_out = (nn.Linear(config.hidden_size, embed_dim, bias=False)
                            if has_proj else None)
        has_final_norm = (config.do_layer_norm_before
                          and not getattr(config, "_remove_final_layer_norm", False))
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
                                 if has_final_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, backend)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + _POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, attn_metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class _OPTModel(nn.Module):
    # Mirrors HF's ``model.decoder`` nesting so checkpoint names map one to one.
    def __init__(self, config, backend):
        super().__init__()
        self.decoder = OPTDecoder(config, backend)


class OPTForCausalLM(nn.Module):
    """Args:
        config: an HF ``OPTConfig``.
        backend: attention backend shared by every layer.
    """

    # Built under a tensor-parallel group, the layers shard (see worker_svc/parallel).
    supports_tensor_parallel = True

    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.model = _OPTModel(config, backend)
        self.lm_head = ParallelLMHead(config.word_embed_proj_dim, config.vocab_size)
        self.is_tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.is_tied:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Packed ``[T]`` ids and positions -> hidden ``[T, word_embed_proj_dim]``."""
        return self.model.decoder(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` float32 logits (``float32=False``: in the LM
        head's dtype)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; accepts names with or without the ``model.`` prefix."""
        size = self.config.hidden_size
        stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", size),
                   "v_proj": ("qkv_proj", 2 * size)}
        skip = ("lm_head.weight",) if self.is_tied else ()

        def prefixed():
            for name, tensor in weights:
                # Old OPT checkpoints store "decoder.*" without the "model." prefix.
                yield (f"model.{name}" if name.startswith("decoder.") else name), tensor

        check_all_loaded(self, load_named_weights(self, prefixed(), stacked, skip))
