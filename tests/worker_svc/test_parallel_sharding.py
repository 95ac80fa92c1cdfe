"""Tensor-parallel sharding without processes: the slices each rank takes put back together
give the full tensors, heads map onto the KV heads GQA pairs them with, and models that
cannot be split are refused naming tensor_parallel_size."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from gridllm.common.config import ModelConfig, engine_configs
from worker_svc.models import (
    get_model_class,
    sharded_architectures,
    supported_architectures,
)
from worker_svc.parallel.sharding import (
    ShardPart,
    ShardSpec,
    check_tensor_parallel,
    even_part,
    padded_part,
    shard_heads,
)
from worker_svc.parallel.state import SINGLE, building, current, state_for


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_merged_shards_reassemble_the_full_tensor(world_size):
    q, kv, hidden = 8 * world_size, 4 * world_size, 5
    full = torch.randn(q + 2 * kv, hidden)
    shards = []
    for rank in range(world_size):
        spec = ShardSpec(0, (even_part(q, rank, world_size), even_part(kv, rank, world_size),
                             even_part(kv, rank, world_size)))
        local = spec.take(full)
        assert local.shape == (full.shape[0] // world_size, hidden)
        assert spec.full_shape(local.shape) == tuple(full.shape)
        shards.append(local.split([q // world_size, kv // world_size, kv // world_size]))
    for part, rows in enumerate(full.split([q, kv, kv])):
        assert torch.equal(torch.cat([s[part] for s in shards]), rows)


def test_vocab_shards_pad_the_last_rank_with_zero_rows():
    vocab, world_size = 10, 4
    full = torch.randn(vocab, 3)
    shards = [ShardSpec(0, (padded_part(vocab, r, world_size),)).take(full)
              for r in range(world_size)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(shards)[:vocab], full)
    assert not torch.cat(shards)[vocab:].any()


def test_column_shards_of_a_row_parallel_weight():
    full = torch.randn(6, 8)
    spec = ShardSpec(1, (even_part(8, 1, 2),))
    assert torch.equal(spec.take(full), full[:, 4:])
    assert torch.equal(spec.take_part(spec.part_at(0), full), full[:, 4:])
    with pytest.raises(ValueError, match="expected 8 entries"):
        spec.take_part(0, full[:, :7])


def test_part_at_maps_full_offsets_to_parts():
    spec = ShardSpec(0, (ShardPart(8, 0, 4), ShardPart(2, 0, 1), ShardPart(2, 0, 1)))
    assert [spec.part_at(o) for o in (0, 8, 10)] == [0, 1, 2]
    assert [spec.local_offset(i) for i in range(3)] == [0, 4, 5]
    with pytest.raises(ValueError):
        spec.part_at(3)


@pytest.mark.parametrize("num_heads,num_kv_heads,world_size", [
    (4, 2, 2), (4, 2, 4), (8, 8, 4), (32, 8, 8), (32, 8, 2), (16, 2, 8), (4, 4, 1)])
def test_each_rank_holds_the_kv_heads_its_query_heads_use(num_heads, num_kv_heads,
                                                          world_size):
    group = num_heads // num_kv_heads
    for rank in range(world_size):
        shard = shard_heads(num_heads, num_kv_heads, rank, world_size)
        assert shard.num_heads * world_size == num_heads
        local_group = shard.num_heads // shard.num_kv_heads
        for i in range(shard.num_heads):
            # Local query head i reads local KV head i // local_group.
            full_kv = (shard.head_start + i) // group
            assert shard.kv_head_start + i // local_group == full_kv


def _hf_config(model_type: str, **kwargs):
    return AutoConfig.for_model(model_type, **kwargs)


def test_unsharded_architectures_are_refused():
    config = _hf_config("llama", num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128)
    # A model class without sharded layers (every shipped one has them).
    unsharded = type("UnshardedForCausalLM", (), {})
    with pytest.raises(ValueError, match="tensor_parallel_size=2: UnshardedForCausalLM is not "
                                         "sharded yet"):
        check_tensor_parallel(config, "UnshardedForCausalLM", unsharded, 2)
    check_tensor_parallel(config, "UnshardedForCausalLM", unsharded, 1)


def test_opts_mlp_width_is_its_ffn_dim():
    from transformers import OPTConfig

    config = OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=130)
    with pytest.raises(ValueError, match="tensor_parallel_size must divide the model's "
                                         "ffn_dim 130, got 4"):
        check_tensor_parallel(config, "OPTForCausalLM", get_model_class("OPTForCausalLM"), 4)
    check_tensor_parallel(config, "OPTForCausalLM", get_model_class("OPTForCausalLM"), 2)


def test_every_supported_architecture_is_sharded():
    assert sharded_architectures() == supported_architectures()


@pytest.mark.parametrize("changes,size,message", [
    (dict(num_attention_heads=6, num_key_value_heads=6), 4, "6 attention heads"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 2, "3 KV heads"),
    (dict(intermediate_size=130), 4, "intermediate_size 130"),
])
def test_shapes_that_do_not_split_are_refused(changes, size, message):
    settings = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                    hidden_size=96)
    config = _hf_config("llama", **{**settings, **changes})
    with pytest.raises(ValueError, match=f"tensor_parallel_size must .*{message}"):
        check_tensor_parallel(config, "LlamaForCausalLM", get_model_class("LlamaForCausalLM"),
                              size)


def test_tensor_parallel_size_is_validated_and_reaches_the_model_config():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            ModelConfig("m", tensor_parallel_size=bad)
    model_config, _, _ = engine_configs("m", tensor_parallel_size=2)
    assert model_config.tensor_parallel_size == 2


def test_a_sharded_model_needs_its_process_group():
    assert state_for(1) is SINGLE
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 needs a process group"):
        state_for(2)
    assert current() is SINGLE
    with building(SINGLE):
        assert current() is SINGLE
