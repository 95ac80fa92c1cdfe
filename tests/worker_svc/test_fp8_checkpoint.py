"""FP8 checkpoints (vLLM's fp8, compressed-tensors and fbgemm_fp8 layouts) are served with
their stored e4m3 weights and scales: compared with quantizing the float checkpoint at load
(the same bytes when the stored scales are per channel) and with transformers on the
dequantized weights (the values the stored weights stand for)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gridllm import LLM, SamplingParams
from gridllm.common.config import ModelConfig
from kernels.fp8 import quantize_fp8
from tests.worker_svc.fp8_checkpoints import (
    COMPRESSED_TENSORS_CHANNEL,
    FBGEMM,
    fp8_config,
    write_fp8_checkpoint,
    write_kv_scales_checkpoint,
)
from tests.worker_svc.hf_reference import hf_prompt_logits
from tests.worker_svc.test_models import _caches, _packed_metadata
from worker_svc.layers.fp8_checkpoint import Fp8Checkpoint, fp8_checkpoint
from worker_svc.layers.quantization import Fp8Linear, quantize_per_row
from worker_svc.loader import load_model

PROMPT = [5, 17, 250, 3, 99, 42, 8, 160, 71, 12, 300, 9]


def _prompt_logits(model, hf_config, prompt: list[int]) -> torch.Tensor:
    metadata = _packed_metadata([len(prompt)], [[2, 0, 3]])
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)),
                       _caches(hf_config, 4), metadata)
        return model.compute_logits(hidden)


def _fp8_layers(model) -> dict[str, Fp8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


@pytest.mark.parametrize("config,arch", [
    (COMPRESSED_TENSORS_CHANNEL, "llama"), (FBGEMM, "llama"),
    (COMPRESSED_TENSORS_CHANNEL, "qwen2"), (COMPRESSED_TENSORS_CHANNEL, "qwen3"),
    (COMPRESSED_TENSORS_CHANNEL, "mistral"), (COMPRESSED_TENSORS_CHANNEL, "gemma2")],
    ids=["compressed-tensors", "fbgemm_fp8", "qwen2", "qwen3", "mistral", "gemma2"])
def test_per_channel_checkpoint_is_served_as_stored(config, arch, tiny_model_dir, tmp_path):
    """Per-channel scales as quantization='fp8' makes them at load: the same e4m3 bytes and
    scales in every layer, so the same logits, bit for bit, with and without the flag
    (each family quantization='fp8' serves)."""
    source = tiny_model_dir(arch)
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), config)
    expected, hf_config = load_model(ModelConfig(model=source, device="cpu",
                                                 quantization="fp8"))
    for quantization in (None, "fp8"):
        model, _ = load_model(ModelConfig(model=path, device="cpu", quantization=quantization))
        layers, expected_layers = _fp8_layers(model), _fp8_layers(expected)
        assert layers.keys() == expected_layers.keys()
        assert len(layers) == 4 * hf_config.num_hidden_layers
        for name, layer in layers.items():
            assert torch.equal(layer.weight.view(torch.uint8),
                               expected_layers[name].weight.view(torch.uint8)), name
            assert torch.equal(layer.weight_scale, expected_layers[name].weight_scale), name
        assert torch.equal(_prompt_logits(model, hf_config, PROMPT),
                           _prompt_logits(expected, hf_config, PROMPT))


def test_per_tensor_scales_stay_with_their_part_of_a_merged_layer(tiny_model_dir, tmp_path):
    """q, k and v (gate and up) stored with scales a factor of up to 16 apart: each part's
    rows of the merged layer keep their own scale, so up to 16 tokens (where only the weight
    is quantized) give transformers' logits on the dequantized weights. Static input
    scales and KV-cache scales in the checkpoint are not used."""
    source = tiny_model_dir("llama")
    extra = {f"model.layers.{i}.self_attn.{kind}": torch.tensor(0.02)
             for i in range(2) for kind in ("q_proj.input_scale", "k_scale", "v_scale")}
    path = write_fp8_checkpoint(
        source, str(tmp_path / "fp8"), fp8_config(activation_scheme="static"), scales="tensor",
        factors={"k_proj": 4.0, "v_proj": 0.25, "up_proj": 2.0, "down_proj": 0.5},
        extra=extra)
    model, hf_config = load_model(ModelConfig(model=path, device="cpu"))
    assert len(_fp8_layers(model)) == 8
    scales = model.model.layers[0].self_attn.qkv_proj.weight_scale
    assert len(set(scales.tolist())) == 3  # one per part, repeated over its rows
    torch.testing.assert_close(_prompt_logits(model, hf_config, PROMPT),
                               hf_prompt_logits(path + "-ref", PROMPT), atol=1e-4, rtol=1e-4)


def test_block_scales_are_quantized_again_per_channel(tiny_model_dir, tmp_path):
    """Block-wise scales (blocks of 32 x 48: the last column block is partial) become
    per-channel scales of the dequantized weight; an ignored layer stays float, stored as
    is; an e4m3 LM head is dequantized into the float head."""
    source = tiny_model_dir("llama")
    keep = "model.layers.0.mlp.down_proj"
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"),
                                fp8_config(weight_block_size=[32, 48], ignored_layers=[keep]),
                                scales="block", block=(32, 48), keep=(keep,), lm_head=True,
                                factors={"k_proj": 4.0})
    model, _ = load_model(ModelConfig(model=path, device="cpu"))
    reference = load_file(os.path.join(path + "-ref", "model.safetensors"))
    layers = _fp8_layers(model)
    assert len(layers) == 7 and isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, reference[keep + ".weight"])
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"])
    prefix = "model.layers.1.self_attn."
    merged = torch.cat([reference[f"{prefix}{p}_proj.weight"] for p in "qkv"])
    weight, scale = quantize_per_row(merged)
    layer = layers["model.layers.1.self_attn.qkv_proj"]
    assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale[:, 0])


def test_an_fp8_checkpoint_generates_through_the_llm_api(tiny_model_dir, tmp_path):
    """LLM(model=<FP8 checkpoint>) without a quantization flag: the greedy tokens of the
    float checkpoint quantized at load (the same weights)."""
    source = tiny_model_dir("llama")
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL)
    stored, at_load = _greedy_stored_and_at_load(
        path, source, [PROMPT, PROMPT[:5]], 8, dict(device="cpu", num_kv_blocks=32))
    assert stored == at_load and all(len(ids) == 8 for ids in stored)


def _greedy_stored_and_at_load(path: str, source: str, prompts: list[list[int]],
                               max_tokens: int, engine: dict) -> list[list[list[int]]]:
    """Greedy ids of ``prompts`` through ``LLM``: the FP8 checkpoint at ``path`` without a
    flag, then its float ``source`` with ``quantization="fp8"``."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = []
    for model, quantization in ((path, None), (source, "fp8")):
        with LLM(model, quantization=quantization, skip_tokenizer_init=True, **engine) as llm:
            outputs.append([o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)])
    return outputs


def _rewrite(path: str, config=None, tensors=None) -> str:
    """Change a written checkpoint in place: ``config(dict)`` edits quantization_config,
    ``tensors(dict)`` the stored tensors."""
    if config is not None:
        with open(os.path.join(path, "config.json")) as f:
            data = json.load(f)
        config(data["quantization_config"])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(data, f)
    if tensors is not None:
        state = load_file(os.path.join(path, "model.safetensors"))
        tensors(state)
        save_file(state, os.path.join(path, "model.safetensors"))
    return path


_Q = "model.layers.0.self_attn.q_proj"
_GROUP = lambda c: c["config_groups"]["group_0"]  # noqa: E731
BAD_CHECKPOINTS = {
    "quant method": (dict(config=lambda c: c.update(quant_method="gptq")),
                     "quantization_config.quant_method 'gptq' is not served"),
    "int4 weights": (dict(config=lambda c: _GROUP(c)["weights"].update(num_bits=4, type="int")),
                     r"config_groups.group_0.weights is 4-bit int"),
    "group strategy": (dict(config=lambda c: _GROUP(c)["weights"].update(strategy="group")),
                       r"weights.strategy must be"),
    "asymmetric": (dict(config=lambda c: _GROUP(c)["weights"].update(symmetric=False)),
                   r"weights.symmetric must be true"),
    "pack format": (dict(config=lambda c: c.update(format="pack-quantized")),
                    r"quantization_config.format 'pack-quantized'"),
    "ignore list": (dict(config=lambda c: c.update(ignore="lm_head")),
                    r"quantization_config.ignore must be a list"),
    "part ignored": (dict(config=lambda c: c.update(ignore=[_Q])),
                     r"keeps 'model.layers.0.self_attn.q_proj' unquantized but not"),
    "no scale": (dict(tensors=lambda s: s.pop(_Q + ".weight_scale")),
                 r"'model.layers.0.self_attn.q_proj.weight' is float8_e4m3fn but .* no "
                 r"weight_scale"),
    "scale shape": (dict(tensors=lambda s: s.update({_Q + ".weight_scale": torch.ones(3)})),
                    r"'model.layers.0.self_attn.q_proj.weight_scale' has shape \(3,\)"),
    "nan scale": (dict(tensors=lambda s: s[_Q + ".weight_scale"].__setitem__(3, float("nan"))),
                  r"'model.layers.0.self_attn.q_proj.weight_scale' must hold finite"),
    "negative scale": (dict(tensors=lambda s: s[_Q + ".weight_scale"].mul_(-1)),
                       r"'model.layers.0.self_attn.q_proj.weight_scale' must hold finite, "
                       r"non-negative"),
    "e5m2": (dict(tensors=lambda s: s.update({_Q + ".weight": s[_Q + ".weight"].float().to(
        torch.float8_e5m2)})), r"'model.layers.0.self_attn.q_proj.weight' is "
                               r"torch.float8_e5m2"),
    "float weight": (dict(tensors=lambda s: s.update({_Q + ".weight": s[_Q + ".weight"].float()})),
                     r"'model.layers.0.self_attn.q_proj.weight' is torch.float32, but "
                     r"quantization_config says"),
    "stray scale": (dict(tensors=lambda s: s.update({"model.norm.weight_scale": torch.ones(1)})),
                    r"'model.norm.weight_scale' scales no float8_e4m3fn weight"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_checkpoint_gridllm_cannot_serve_is_refused_naming_the_field(case, tiny_model_dir,
                                                                     tmp_path):
    changes, message = BAD_CHECKPOINTS[case]
    path = write_fp8_checkpoint(tiny_model_dir("llama"), str(tmp_path / "fp8"),
                                copy.deepcopy(COMPRESSED_TENSORS_CHANNEL))
    _rewrite(path, **changes)
    with pytest.raises(ValueError, match=message):
        load_model(ModelConfig(model=path, device="cpu"))


def test_other_families_and_fields_are_refused(tiny_model_dir, tmp_path):
    path = write_fp8_checkpoint(tiny_model_dir("opt"), str(tmp_path / "opt"),
                                fp8_config(), scales="tensor")
    with pytest.raises(ValueError, match="and so do FP8 checkpoints"):
        load_model(ModelConfig(model=path, device="cpu"))
    for fields, message in ((dict(weight_block_size=[128]), "weight_block_size must be two"),
                            (dict(activation_scheme="per-group"), "activation_scheme must be"),
                            (dict(fmt="e5m2"), "fmt must be 'e4m3'"),
                            (dict(ignored_layers=[1]), "ignored_layers must be a list")):
        hf_config = type("Config", (), {"quantization_config": fp8_config(**fields)})
        with pytest.raises(ValueError, match=message):
            fp8_checkpoint(hf_config)


def test_ignore_entries_match_names_patterns_and_wildcards():
    checkpoint = Fp8Checkpoint("compressed-tensors", None,
                               ("lm_head", "re:.*layers\\.1\\..*proj$", "*.0.mlp.down_proj"))
    assert checkpoint.ignores("lm_head")
    assert checkpoint.ignores("model.layers.1.self_attn.q_proj")
    assert checkpoint.ignores("model.layers.0.mlp.down_proj")
    assert not checkpoint.ignores("model.layers.0.mlp.up_proj")
    assert not checkpoint.ignores("model.layers.10.self_attn.q_proj")
    assert not checkpoint.ignores("lm_head_extra")


def _kv_caches(hf_config, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.to(dtype), v.to(dtype)) for k, v in _caches(hf_config, 4)]


@pytest.mark.parametrize("names,backend", [("k_scale", "torch"), ("output_scale", "torch"),
                                           ("k_scale", "triton")])
def test_calibrated_kv_cache_scales_are_each_layers_own(names, backend, tiny_model_dir,
                                                        tmp_path):
    """KV-cache scales stored per attention layer (as ``k_scale``/``v_scale`` or one
    ``kv_scale``, or as the k and v projections' per-head ``output_scale``, taken at the
    largest), calibrated here as amax / 224 of the prompt's keys and values, are the
    scales of that layer's FP8 cache in either attention backend: each layer's cache holds
    its keys and values divided by them (layer 0's exactly the float run's, divided), and
    reading it back is as close to the float cache's logits as an FP8 cache of scale 1.0
    (a write or read without the layer's scale is off by 1/scale)."""
    source = tiny_model_dir("llama")
    metadata = _packed_metadata([len(PROMPT)], [[2, 0, 3]])
    model, hf_config = load_model(ModelConfig(model=source, device="cpu",
                                              quantization="fp8", attention_backend=backend))
    float_caches = _kv_caches(hf_config, torch.float32)
    with torch.inference_mode():
        float_logits = model.compute_logits(model(torch.tensor(PROMPT),
                                                  torch.arange(len(PROMPT)), float_caches,
                                                  metadata))
        # The same weights over an FP8 cache of scale 1.0: e4m3's own rounding.
        uncalibrated = (model.compute_logits(model(
            torch.tensor(PROMPT), torch.arange(len(PROMPT)),
            _kv_caches(hf_config, torch.float8_e4m3fn), metadata)) - float_logits).abs().max()
    expected = [(float(k.abs().max()) / 224, float(v.abs().max()) / 224)
                for k, v in float_caches]
    assert max(max(pair) for pair in expected) < 0.1  # far from e4m3's range at scale 1
    prefix = "model.layers.{}.self_attn."
    if names == "k_scale":
        expected[1] = (max(expected[1]), max(expected[1]))
        extra = {prefix.format(0) + "k_scale": torch.tensor(expected[0][0]),
                 prefix.format(0) + "v_scale": torch.tensor([expected[0][1]]),
                 prefix.format(1) + "kv_scale": torch.tensor(expected[1][0])}
    else:
        extra = {prefix.format(i) + f"{p}_proj.output_scale": torch.tensor(
            [scales[j] / 2, scales[j]]) for i, scales in enumerate(expected)
            for j, p in enumerate("kv")}
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL,
                                extra=extra)
    model, hf_config = load_model(ModelConfig(model=path, device="cpu",
                                              attention_backend=backend))
    for layer, scales in zip(model.model.layers, expected, strict=True):
        assert layer.self_attn.kv_scales == pytest.approx(scales, rel=1e-6)
    logits, caches = {}, {}
    for dtype in (torch.float32, torch.float8_e4m3fn):
        caches[dtype] = _kv_caches(hf_config, dtype)
        with torch.inference_mode():
            hidden = model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), caches[dtype],
                           metadata)
            logits[dtype] = model.compute_logits(hidden)
    for (k8, v8), (k, v), scales in zip(caches[torch.float8_e4m3fn], caches[torch.float32],
                                        model.model.layers, strict=True):
        k_scale, v_scale = scales.self_attn.kv_scales
        for cache, exact, scale in ((k8, k, k_scale), (v8, v, v_scale)):
            if scales is model.model.layers[0]:
                assert torch.equal(cache.view(torch.uint8),
                                   quantize_fp8(exact, scale).view(torch.uint8))
            # Later layers' keys differ a little: they follow an FP8 cache's attention.
            assert (cache.float() * scale - exact).abs().max() < 0.1 * exact.abs().max()
    assert torch.equal(logits[torch.float32], float_logits)
    # e4m3's relative rounding does not depend on the scale: about the same error.
    error = (logits[torch.float8_e4m3fn] - float_logits).abs().max()
    assert error < 2 * uncalibrated, (error, uncalibrated)


def test_a_bad_kv_cache_scale_is_refused_naming_the_tensor(tiny_model_dir, tmp_path):
    for name, value, message in (
            ("model.layers.0.self_attn.k_scale", torch.tensor(0.0), "positive finite"),
            ("model.layers.0.self_attn.v_scale", torch.tensor([1.0, float("nan")]),
             "positive finite"),
            ("model.layers.0.mlp.k_scale", torch.tensor(1.0), "is no attention layer")):
        path = write_fp8_checkpoint(tiny_model_dir("llama"), str(tmp_path / name),
                                    COMPRESSED_TENSORS_CHANNEL, extra={name: value})
        with pytest.raises(ValueError, match=f"'{name}'.*{message}"):
            load_model(ModelConfig(model=path, device="cpu"))


def test_the_roofline_counts_an_fp8_checkpoint_one_byte_a_weight(tiny_model_dir, tmp_path):
    """The benchmarks' roofline (weights read per decode step) of an FP8 checkpoint: that
    of its float checkpoint quantized at load."""
    from gridllm.bench.roofline import model_decode_weight_bytes

    source = tiny_model_dir("llama")
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL)
    fp8 = model_decode_weight_bytes(source, torch.bfloat16, "fp8")
    assert model_decode_weight_bytes(path, torch.bfloat16) == fp8
    assert fp8 < model_decode_weight_bytes(source, torch.bfloat16)


def test_scales_in_another_shard_than_their_weights(tiny_model_dir, tmp_path):
    """A sharded checkpoint whose scales all sit in the first shard and weights in the
    second (each scale read before its weight) loads as the single file does."""
    source = tiny_model_dir("llama")
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL)
    expected, _ = load_model(ModelConfig(model=path, device="cpu"))
    state = load_file(os.path.join(path, "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    names = sorted(shards)
    for name, tensor in state.items():
        shards[names[0] if name.endswith("weight_scale") else names[1]][name] = tensor
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, os.path.join(path, shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    model, _ = load_model(ModelConfig(model=path, device="cpu"))
    for (name, got), (_, want) in zip(_fp8_layers(model).items(),
                                      _fp8_layers(expected).items(), strict=True):
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, want.weight_scale), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_fp8_checkpoint_on_the_gpu_generates_as_quantizing_at_load(tiny_model_dir,
                                                                      tmp_path):
    """On CUDA in bfloat16 (the e4m3 GEMV, the FP8 GEMMs, an FP8 KV cache): the same greedy
    tokens as the float checkpoint quantized at load, which holds the same weights. The
    float weights are bfloat16 values first: quantizing at load in bfloat16 rounds them to
    bfloat16 before e4m3 (H200, 2026-12-05: from float32 weights that double rounding
    flipped the 12th token of one prompt)."""
    source = _rewrite(shutil.copytree(tiny_model_dir("llama"), str(tmp_path / "bf16")),
                      tensors=lambda state: state.update(
                          {k: v.to(torch.bfloat16).float() for k, v in state.items()}))
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL)
    stored, at_load = _greedy_stored_and_at_load(
        path, source, [PROMPT * 3, PROMPT[:1], PROMPT[:7]], 12,
        dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, kv_cache_dtype="fp8",
             enforce_eager=True))
    assert stored == at_load


def test_kv_cache_scales_alone_keep_the_weights_float(tiny_model_dir, tmp_path):
    """A compressed-tensors checkpoint whose only quantization is its KV cache: the weights
    load as stored (quantization='fp8' may still quantize them at load), each attention
    layer takes its scales, and the roofline counts float weights."""
    from gridllm.bench.roofline import model_decode_weight_bytes

    source = tiny_model_dir("llama")
    path = write_kv_scales_checkpoint(source, str(tmp_path / "kv"), [(0.5, 0.25), (2.0, 1.0)])
    for quantization, num_fp8 in ((None, 0), ("fp8", 8)):
        model, _ = load_model(ModelConfig(model=path, device="cpu", quantization=quantization))
        assert len(_fp8_layers(model)) == num_fp8
        assert [layer.self_attn.kv_scales for layer in model.model.layers] == [
            (0.5, 0.25), (2.0, 1.0)]
    float_model, _ = load_model(ModelConfig(model=source, device="cpu"))
    assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)
    assert model_decode_weight_bytes(path, torch.bfloat16) == model_decode_weight_bytes(
        source, torch.bfloat16)
    _rewrite(path, config=lambda c: c["kv_cache_scheme"].update(num_bits=4))
    with pytest.raises(ValueError, match="quantization_config.kv_cache_scheme must be 8-bit"):
        load_model(ModelConfig(model=path, device="cpu"))


def test_vllm_names_of_checkpoint_layouts_check_the_checkpoint(tiny_model_dir, tmp_path):
    """quantization='compressed-tensors' or 'fbgemm_fp8' (as vLLM takes them) serve a
    checkpoint of that layout as stored, and are refused, naming the setting, for another
    layout or a float checkpoint (which only 'fp8' quantizes at load)."""
    source = tiny_model_dir("llama")
    path = write_fp8_checkpoint(source, str(tmp_path / "fp8"), COMPRESSED_TENSORS_CHANNEL)
    model, _ = load_model(ModelConfig(model=path, device="cpu",
                                      quantization="compressed-tensors"))
    assert len(_fp8_layers(model)) == 8
    for model_name, quantization, found in (
            (path, "fbgemm_fp8", "quant_method 'compressed-tensors'"),
            (source, "compressed-tensors", "no quantization_config"),
            ("random:tiny", "fbgemm_fp8", "no quantization_config")):
        with pytest.raises(ValueError, match=f"quantization='{quantization}' names the "
                                             f"layout of an FP8 checkpoint, but the "
                                             f"checkpoint has {found}"):
            load_model(ModelConfig(model=model_name, device="cpu", quantization=quantization))


def test_the_projections_are_never_built_in_the_models_dtype(tiny_model_dir, tmp_path):
    """Loading an FP8 checkpoint builds the parallel projections on the meta device (no
    memory in the model's dtype), replaces them by e4m3 layers and allocates the ones kept
    float (a tensor-parallel shard's attributes kept); nothing is left on the meta
    device."""
    from worker_svc.loader import materialize_meta, parallel_linears_on_meta
    from worker_svc.parallel.layers import ColumnParallelLinear, RowParallelLinear

    with parallel_linears_on_meta():
        column = ColumnParallelLinear.merged(8, [4, 4], True)
        row = RowParallelLinear(8, 4, False)
    assert column.weight.is_meta and column.bias.is_meta and row.weight.is_meta
    assert not ColumnParallelLinear.merged(8, [2], False).weight.is_meta  # restored after
    column.weight.tp_shard = "spec"
    holder = nn.Sequential(column)
    materialize_meta(holder, torch.device("cpu"))
    assert holder[0].weight.device.type == "cpu" and holder[0].weight.tp_shard == "spec"
    keep = "model.layers.0.mlp.down_proj"
    path = write_fp8_checkpoint(tiny_model_dir("llama"), str(tmp_path / "fp8"),
                                fp8_config(ignored_layers=[keep]), scales="tensor",
                                keep=(keep,))
    model, _ = load_model(ModelConfig(model=path, device="cpu"))
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert isinstance(model.model.layers[0].mlp.down_proj, RowParallelLinear)
