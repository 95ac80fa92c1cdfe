"""FP8 checkpoints written from a tiny float32 model, in the layouts quantization tools save:
decoder linear weights as float8_e4m3fn with per-channel, per-tensor or block-wise scales
and a ``quantization_config`` in config.json; and the same model dequantized (the values the
stored e4m3 weights and scales stand for) as a plain float32 checkpoint, the reference."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from kernels.fp8 import quantize_fp8
from worker_svc.layers.quantization import quantize_per_row

# The decoder's linear layers of the Llama family, as the checkpoints name them.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

COMPRESSED_TENSORS_CHANNEL = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                    "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True, "symmetric": True}}},
    "ignore": ["lm_head"], "kv_cache_scheme": None}
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
          "modules_to_not_convert": ["lm_head"]}


def fp8_config(**fields) -> dict:
    """vLLM's ``quant_method: "fp8"`` config."""
    return {"quant_method": "fp8", "activation_scheme": "dynamic", **fields}


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantize_fp8(x, scale)


def _quantized(weight: torch.Tensor, scales: str, block: tuple[int, int] | None,
               factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e4m3 weight, stored scale, scale broadcast over the weight)``."""
    rows, cols = weight.shape
    if scales == "channel":  # as quantization="fp8" quantizes a float checkpoint at load
        weight_q, scale = quantize_per_row(weight)
        return weight_q, scale, scale
    if scales == "tensor":
        scale = weight.abs().amax() * (1 / 448.0) * factor
        return _e4m3(weight, scale), scale.reshape(1), scale.reshape(1, 1)
    br, bc = block
    tiles = weight.new_zeros(-(-rows // br), -(-cols // bc))
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):
            tiles[i, j] = weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().amax()
    scale = tiles * (1 / 448.0) * factor
    full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return _e4m3(weight, full), scale, full


def write_fp8_checkpoint(source: str, target: str, quantization_config: dict,
                         scales: str = "channel", block: tuple[int, int] | None = None,
                         keep: tuple[str, ...] = (), lm_head: bool = False,
                         factors: dict[str, float] | None = None,
                         extra: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``source`` (a float32 HF directory of one safetensors file) to ``target`` with
    its decoder linear weights in e4m3, and the dequantized model to ``target + "-ref"``.

    Args:
        quantization_config: written into config.json as is.
        scales: ``"channel"``, ``"tensor"`` or ``"block"`` (with ``block``); the scale is
            stored as ``weight_scale``, or ``weight_scale_inv`` for blocks.
        keep: layer names (``model.layers.0.mlp.down_proj``) left in float32.
        lm_head: store the LM head in e4m3 too.
        factors: a layer kind's per-tensor or block scale multiplied by this
            (``{"k_proj": 4.0}``), so the parts of a merged layer have clearly different
            scales.
        extra: more tensors to store (static input scales, KV-cache scales).
    Returns:
        ``target``.
    """
    state = load_file(os.path.join(source, "model.safetensors"))
    stored, reference = {}, {}
    scale_name = "weight_scale_inv" if scales == "block" else "weight_scale"
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        kind = prefix.rpartition(".")[2]
        quantized = leaf == "weight" and prefix not in keep and (
            kind in LINEARS or (lm_head and prefix == "lm_head"))
        if not quantized:
            stored[name] = reference[name] = tensor
            continue
        factor = (factors or {}).get(kind, 1.0)
        weight, scale, full = _quantized(tensor.float(), scales, block, factor)
        stored[name] = weight
        stored[f"{prefix}.{scale_name}"] = scale.float().contiguous()
        reference[name] = weight.float() * full
    stored.update(extra or {})
    for directory, tensors, quantization in ((target, stored, quantization_config),
                                             (target + "-ref", reference, None)):
        shutil.copytree(source, directory)
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        if quantization is not None:
            config["quantization_config"] = quantization
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return target


# compressed-tensors' config of float weights with calibrated FP8 KV-cache scales.
KV_CACHE_SCALES_ONLY = {
    "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                        "dynamic": False, "symmetric": True}}


def write_kv_scales_checkpoint(source: str, target: str,
                               scales: list[tuple[float, float]]) -> str:
    """Copy ``source`` (an HF directory of one safetensors file) to ``target`` with
    ``self_attn.k_scale``/``v_scale`` of each layer (``scales[i]``) and a
    ``quantization_config`` saying so; the weights stay as stored. Returns ``target``."""
    shutil.copytree(source, target)
    path = os.path.join(target, "model.safetensors")
    state = load_file(path)
    for i, (k_scale, v_scale) in enumerate(scales):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k_scale)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v_scale)
    save_file(state, path)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = KV_CACHE_SCALES_ONLY
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    return target
