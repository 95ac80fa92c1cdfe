"""Llama family decoder (Llama 2/3, SmolLM2, TinyLlama); Mistral and Qwen2/3 reuse it.

q/k/v and gate/up projections are merged into one matmul each; ``load_weights`` maps the
HF names onto the merged rows. Batches are packed ``[T, ...]`` with no padding.

Built under a tensor-parallel group (worker_svc/parallel) the model is Megatron-sharded:
qkv and gate/up column-parallel, o_proj and down_proj row-parallel (one all-reduce per
attention and per MLP block), the embedding and LM head split over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from worker_svc.layers import ops
from worker_svc.layers.attention import AttentionBackend, AttentionMetadata
from worker_svc.layers.layers import RMSNorm, SiluAndMul, get_activation
from worker_svc.layers.rotary import RotaryEmbedding
from worker_svc.models.attention_pattern import layer_sliding_windows
from worker_svc.models.weights import check_all_loaded, load_named_weights
from worker_svc.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from worker_svc.parallel.sharding import ShardPart, shard_heads
from worker_svc.parallel.state import current

KVCache = tuple[torch.Tensor, torch.Tensor]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The layer's attention window (None: full attention), as the config declares it."""
    return layer_sliding_windows(config)[layer_idx]


class LlamaAttention(nn.Module):
    """Merged qkv projection, optional per-head q/k norms, rotary embedding fused into the
    backend's KV write, this layer's window; subclasses (Gemma) change the scale, the norms
    and soft-capping."""

    # Attention scores are capped at c * tanh(s / c) when set (Gemma 2).
    logit_softcap: float | None = None
    # The layer's KV group (set by the runner when the model has several).
    kv_group: int = 0
    # This layer's (k_scale, v_scale) for an FP8 KV cache (an FP8 checkpoint's calibrated
    # scales, set at load); None: the backend's.
    kv_scales: tuple[float, float] | None = None

    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, *, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 norm_cls: type[nn.Module] = RMSNorm):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        tp = current()
        # This rank's heads (all of them on a single device).
        heads = shard_heads(total_heads, total_kv_heads, tp.rank, tp.world_size)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.head_dim = hd = head_dim_of(config)
        self.q_size = self.num_heads * hd
        self.kv_size = self.num_kv_heads * hd
        self.scale = self.head_dim ** -0.5
        # The backend's sparse pattern (if any) narrows a window or adds one.
        window = sliding_window_of(config, layer_idx)
        self.sliding_window = window if backend is None else backend.layer_window(window)
        q_part = ShardPart(total_heads * hd, heads.head_start * hd, self.q_size)
        kv_part = ShardPart(total_kv_heads * hd, heads.kv_head_start * hd, self.kv_size)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [q_part, kv_part, kv_part],
                                             bias=qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * hd, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = norm_cls(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm_cls(self.head_dim, config.rms_norm_eps)
        self.has_qk_norm = qk_norm
        # Plain RMSNorms of q and k may run as one in-place kernel (ops.qk_rms_norm_).
        self.qk_norm_in_place = qk_norm and norm_cls is RMSNorm
        self.rotary_emb = rotary
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | None, kv_cache: KVCache,
                attn_metadata: AttentionMetadata, qkv: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``qkv``: the q/k/v projection already computed (then ``hidden`` is not read)."""
        if qkv is None:
            qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm and not (self.qk_norm_in_place and ops.qk_rms_norm_(
                q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)):
            q, k = self.q_norm(q), self.k_norm(k)
        if attn_metadata.groups is not None:
            attn_metadata = attn_metadata.groups[self.kv_group]
        out = self.backend.forward_rotary(positions, self.rotary_emb, q, k, v, kv_cache[0],
                                          kv_cache[1], attn_metadata, self.scale,
                                          self.sliding_window, self.logit_softcap,
                                          self.kv_scales)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear.merged(config.hidden_size, [inter, inter], bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        act = getattr(config, "hidden_act", "silu")
        self.act_and_mul = SiluAndMul() if act == "silu" else _ActAndMul(get_activation(act))

    def fuses_silu(self, x: torch.Tensor) -> bool:
        """Whether SiLU-and-mul runs in the gate/up projection's epilogue for input ``x``
        (FP8 layers replace gate_up_proj too), rather than in the down projection's input
        quantization (``silu_in_down``) or on its own."""
        return (isinstance(self.act_and_mul, SiluAndMul)
                and hasattr(self.gate_up_proj, "forward_silu_and_mul")
                and not self.silu_in_down(x))

    def silu_in_down(self, x: torch.Tensor) -> bool:
        """Whether the FP8 down projection computes SiLU-and-mul while it quantizes its
        input (``Fp8Linear.forward_silu_and_mul_input``) for ``x``'s rows."""
        return (isinstance(self.act_and_mul, SiluAndMul)
                and hasattr(self.down_proj, "forward_silu_and_mul_input")
                and self.down_proj.quantizes_input(x))

    def forward(self, x: torch.Tensor | None, act: torch.Tensor | None = None,
                gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """``act``: the activation ``act(gate) * up`` already computed; ``gate_up``: the
        gate/up projection already computed (with either, ``x`` is not read)."""
        if act is None:
            if gate_up is None and self.fuses_silu(x):
                return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))
            if gate_up is None:
                gate_up = self.gate_up_proj(x)
            if self.silu_in_down(gate_up):
                return self.down_proj.forward_silu_and_mul_input(gate_up)
            act = self.act_and_mul(gate_up)
        return self.down_proj(act)


class _ActAndMul(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, switches: dict):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary, backend, **switches)
        self.mlp = LlamaMLP(config, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata):
        # At decode each add-and-norm runs inside the projection after it (one launch),
        # where ops.add_rms_norm_linear applies (16-bit weights), and SiLU-and-mul in the
        # gate/up projection's epilogue; FP8 layers that quantize their input per token get
        # it quantized by the norm and SiLU-and-mul kernels.
        qkv = None
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            fused = ops.add_rms_norm_linear(hidden, residual, self.input_layernorm,
                                            self.self_attn.qkv_proj)
            if fused is None:
                hidden, residual = self.input_layernorm(hidden, residual)
            else:
                qkv, residual = fused
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata, qkv=qkv)
        silu = self.mlp.fuses_silu(hidden)
        fused = ops.add_rms_norm_linear(hidden, residual, self.post_attention_layernorm,
                                        self.mlp.gate_up_proj, silu_out=silu)
        if fused is None:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        out, residual = fused
        return (self.mlp(None, act=out) if silu else self.mlp(None, gate_up=out)), residual


class LlamaModel(nn.Module):
    def __init__(self, config, backend: AttentionBackend, switches: dict):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, backend, switches)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Args:
        config: the HF config (``LlamaConfig`` or a sibling).
        backend: attention backend shared by every layer.
    """

    # Built under a tensor-parallel group, the layers shard (see worker_svc/parallel).
    supports_tensor_parallel = True
    # Bias switches: None reads config.attention_bias, a bool is fixed by the architecture.
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    has_qk_norm = False

    _STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
                "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        self.config = config
        config_bias = bool(getattr(config, "attention_bias", False))
        switches = dict(qkv_bias=config_bias if self.qkv_bias is None else self.qkv_bias,
                        o_bias=config_bias if self.o_bias is None else self.o_bias,
                        qk_norm=self.has_qk_norm)
        self.model = LlamaModel(config, backend, switches)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.is_tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.is_tied:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        """``[N, hidden] -> [N, vocab]`` float32 logits (``float32=False``: in the LM
        head's dtype, for a sampler that converts only where it computes with them)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...)."""
        head_dim = head_dim_of(self.config)
        q_size = self.config.num_attention_heads * head_dim
        kv_size = (getattr(self.config, "num_key_value_heads", None)
                   or self.config.num_attention_heads) * head_dim
        inter = self.config.intermediate_size
        rows = {"q": 0, "k": q_size, "v": q_size + kv_size, 0: 0, 1: inter}
        stacked = {hf: (merged, rows[part]) for hf, (merged, part) in self._STACKED.items()}
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.is_tied else ())
        check_all_loaded(self, load_named_weights(self, weights, stacked, skip))
