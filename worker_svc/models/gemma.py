"""Gemma 2 and Gemma 3 (text): interleaved local (sliding-window) and global attention layers.

What differs from Llama: embeddings scaled by ``sqrt(hidden_size)``; RMSNorm scaled by
``1 + weight`` and computed in float32; a norm after attention and around the MLP
(sandwich norms); GeGLU (``gelu_pytorch_tanh``); the query scale from
``query_pre_attn_scalar``; tanh soft-capping of attention scores and of the final logits
(Gemma 2); per-head q/k norms and a separate rope base for local layers (Gemma 3); tied
embeddings. Each layer's window comes from ``attention_pattern.layer_sliding_windows``.

Built under a tensor-parallel group the model shards as Llama does (worker_svc/parallel):
the attention is Llama's, gate/up column-parallel, down row-parallel, the embedding and LM
head split over the vocabulary (the soft-cap applies to the gathered logits).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from worker_svc.layers.attention import AttentionBackend, AttentionMetadata
from worker_svc.layers.layers import get_activation
from worker_svc.layers.rotary import RotaryEmbedding
from worker_svc.models.attention_pattern import layer_types_of
from worker_svc.models.llama import LlamaAttention, head_dim_of
from worker_svc.models.weights import check_all_loaded, load_named_weights
from worker_svc.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)

KVCache = tuple[torch.Tensor, torch.Tensor]


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight``, in float32 (the weight is stored as an offset)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class _RopeView:
    """``config`` seen with one layer type's rope settings (Gemma 3 keys them by type)."""

    def __init__(self, config, layer_type: str):
        self._config = config
        self.rope_parameters = config.rope_parameters[layer_type]
        self.rope_scaling = None  # an alias of the per-type dict in transformers v5

    def __getattr__(self, name):
        return getattr(self._config, name)


def _rotaries(config, head_dim: int) -> dict[str, RotaryEmbedding]:
    """One rotary table per layer type; Gemma 2 shares one, Gemma 3 has a local base."""
    params = getattr(config, "rope_parameters", None) or {}
    types = sorted(set(layer_types_of(config)))
    if not any(t in params for t in types):
        shared = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        return {t: shared for t in types}
    return {t: RotaryEmbedding(_RopeView(config, t), head_dim, config.max_position_embeddings)
            for t in types}


def _soft_cap(config, name: str) -> float | None:
    cap = getattr(config, name, None)
    if cap is not None and not cap > 0:
        raise ValueError(f"{name} must be positive or None, got {cap!r}.")
    return cap


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's scale (query_pre_attn_scalar), (1 + w) q/k norms
    (Gemma 3) and attention logit soft-capping (Gemma 2)."""

    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, has_qk_norm: bool):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, rotary, backend, qkv_bias=bias, o_bias=bias,
                         qk_norm=has_qk_norm, norm_cls=GemmaRMSNorm)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.logit_softcap = _soft_cap(config, "attn_logit_softcapping")


class GemmaMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up merged into one matmul."""

    def __init__(self, config):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear.merged(config.hidden_size, [inter, inter],
                                                        bias=False)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False)
        self.act = get_activation(getattr(config, "hidden_activation", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, has_qk_norm: bool):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx, rotary, backend, has_qk_norm)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions, hidden, kv_cache, attn_metadata):
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class GemmaModel(nn.Module):
    def __init__(self, config, backend: AttentionBackend, has_qk_norm: bool):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotaries = _rotaries(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, layer_idx, rotaries[layer_type], backend, has_qk_norm)
            for layer_idx, layer_type in enumerate(layer_types_of(config)))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden = self.embed_tokens(input_ids)
        # The scale is rounded to the weights' dtype first, as transformers does.
        hidden = hidden * torch.tensor(self.hidden_size ** 0.5, dtype=hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, attn_metadata)
        return self.norm(hidden)


class Gemma2ForCausalLM(nn.Module):
    """Args:
        config: the HF ``Gemma2Config`` (or ``Gemma3TextConfig`` for the subclass).
        backend: attention backend shared by every layer.
    Raises:
        ValueError: the config asks for something gridllm cannot run (bidirectional
            attention, soft-capping on a backend without it).
    """

    # Built under a tensor-parallel group, the layers shard (see worker_svc/parallel).
    supports_tensor_parallel = True
    has_qk_norm = False

    _STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
                "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True is not supported: gridllm "
                             "serves causal decoders.")
        if (_soft_cap(config, "attn_logit_softcapping") is not None
                and not backend.supports_logit_softcap):
            raise ValueError(f"attn_logit_softcapping needs an attention backend with "
                             f"soft-capping; the {backend.name!r} backend has none yet: use "
                             f"attention_backend='torch'.")
        self.config = config
        self.model = GemmaModel(config, backend, self.has_qk_norm)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.is_tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.is_tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcap = _soft_cap(config, "final_logit_softcapping")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Args:
            input_ids, positions: ``[T]`` packed over the batch.
            kv_caches: per layer ``(key_cache, value_cache)``.
        Returns:
            Final hidden states ``[T, hidden_size]``.
        """
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` float32 logits, soft-capped if the config says so
        (``float32=False``: in the LM head's dtype where no cap applies)."""
        logits = self.lm_head(hidden)
        if self.final_logit_softcap is None:
            return logits.float() if float32 else logits
        cap = self.final_logit_softcap
        return cap * torch.tanh(logits.float() / cap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...)."""
        head_dim = head_dim_of(self.config)
        q_size = self.config.num_attention_heads * head_dim
        kv_size = (getattr(self.config, "num_key_value_heads", None)
                   or self.config.num_attention_heads) * head_dim
        inter = self.config.intermediate_size
        rows = {"q": 0, "k": q_size, "v": q_size + kv_size, 0: 0, 1: inter}
        stacked = {hf: (merged, rows[part]) for hf, (merged, part) in self._STACKED.items()}
        skip = ("rotary_emb.",) + (("lm_head.weight",) if self.is_tied else ())
        check_all_loaded(self, load_named_weights(self, weights, stacked, skip))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text models (``Gemma3TextConfig``): Gemma 2 with q/k norms, no soft-capping
    by default and a separate rope base (``rope_parameters["sliding_attention"]``) for the
    local layers."""

    has_qk_norm = True
