"""Model forward parity with transformers, per architecture, on tiny random fp32 models."""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from gridllm.common.config import ModelConfig
from kernels import torch_ref
from tests.worker_svc.hf_reference import hf_prompt_logits
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.rotary import RotaryEmbedding
from worker_svc.loader import load_model
from worker_svc.model_runner import kv_cache_geometry

BLOCK_SIZE = 4


def _caches(hf_config, num_blocks):
    num_layers, num_kv_heads, head_dim = kv_cache_geometry(hf_config)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(num_layers)]


def _packed_metadata(lengths, block_tables):
    slots, cu = [], [0]
    for n, table in zip(lengths, block_tables, strict=True):
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]
        cu.append(cu[-1] + n)
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    return AttentionMetadata(slot_mapping=torch.tensor(slots),
                             query_start_loc=torch.tensor(cu, dtype=torch.int32),
                             seq_lens=torch.tensor(lengths, dtype=torch.int32),
                             block_tables=tables, max_query_len=max(lengths),
                             max_seq_len=max(lengths))


def test_packed_prefill_logits_match_transformers(tiny_model_dir, tiny_arch):
    model_dir = tiny_model_dir(tiny_arch)
    model, hf_config = load_model(ModelConfig(model=model_dir, device="cpu"))
    gen = torch.Generator().manual_seed(1)
    # Two prompts packed in one batch; 19 tokens cross block boundaries and exceed
    # Mistral's sliding window of 8; block ids are scattered on purpose.
    prompts = [torch.randint(2, 320, (n,), generator=gen).tolist() for n in (19, 6)]
    tables = [[7, 2, 9, 0, 5], [3, 8]]
    metadata = _packed_metadata([19, 6], tables)
    input_ids = torch.tensor(prompts[0] + prompts[1])
    positions = torch.tensor(list(range(19)) + list(range(6)))
    with torch.inference_mode():
        hidden = model(input_ids, positions, _caches(hf_config, 10), metadata)
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (25, hf_config.vocab_size)
    torch.testing.assert_close(logits[:19], hf_prompt_logits(model_dir, prompts[0]),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[19:], hf_prompt_logits(model_dir, prompts[1]),
                               atol=1e-4, rtol=1e-4)


def test_llama3_rotary_matches_transformers(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("llama3"))
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
    positions = torch.arange(0, 200, 7)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    half = head_dim // 2
    expected = torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)
    torch.testing.assert_close(rotary.cos_sin_cache[positions], expected)
    # The scaled table must differ from plain rope, or the test proves nothing.
    plain = RotaryEmbedding(AutoConfig.from_pretrained(tiny_model_dir("llama")), head_dim, 256)
    assert not torch.allclose(plain.cos_sin_cache[positions], expected)


def test_rotary_layer_uses_reference_op(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    rotary = RotaryEmbedding(config, 16, 64)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    positions = torch.tensor([0, 3, 9, 10, 63])
    got = rotary(positions, q, k)
    want = torch_ref.rotary_embedding(positions, q, k, rotary.cos_sin_cache)
    torch.testing.assert_close(got, want)
