"""FP8 checkpoints: decoder weights stored as float8_e4m3fn with their scales, served as
stored.

A checkpoint says it is quantized in config.json's ``quantization_config``; the layouts of
FP8 checkpoints that vLLM serves are read here too:
- ``quant_method: "fp8"`` (vLLM's and AutoFP8's): ``<layer>.weight`` in e4m3 with a
  per-tensor ``weight_scale``, or with ``weight_block_size`` a block-wise
  ``weight_scale_inv`` (DeepSeek-V3's and Qwen3-FP8's layout); layers kept unquantized
  listed in ``ignored_layers``;
- ``quant_method: "compressed-tensors"`` (llm-compressor's, the ``-FP8`` and
  ``-FP8-dynamic`` model repositories): 8-bit float weights with ``strategy`` ``tensor``,
  ``channel`` or ``block`` and a ``weight_scale``; unquantized layers in ``ignore`` (names,
  or ``re:`` regular expressions);
- ``quant_method: "fbgemm_fp8"`` (Meta's FP8 Llama releases): per-channel ``weight_scale``;
  unquantized layers in ``modules_to_not_convert``.
In each, a weight is ``e4m3 value * scale`` (``weight_scale_inv`` too, despite its name).

Serving one turns ``quantization="fp8"`` on by itself (as vLLM does), except a
compressed-tensors checkpoint whose ``kv_cache_scheme`` is its only quantization (float
weights and calibrated KV-cache scales), which ``quantization="fp8"`` may still quantize
at load. The decoder's linear layers become ``Fp8Linear`` holding the stored e4m3 bytes: a
per-channel scale as stored, a per-tensor scale repeated over its rows, so the merged
q/k/v and gate/up layers keep each part's own scale and compute exactly the products the
checkpoint's authors defined.
Block-wise scales (one per 128 x 128 tile, say) are dequantized in float32 and quantized
again per output channel at load: one more e4m3 rounding, the same as quantizing a
bf16 checkpoint at load. An e4m3 tensor stored for a layer gridllm keeps in the model's
dtype (the LM head, embeddings, an ignored layer) is dequantized at load.

Activations are quantized per token at each call, as with ``quantization="fp8"`` on a bf16
checkpoint: a static ``input_scale`` (``activation_scheme: "static"``) is not used (a
per-token scale is at least as fine). Calibrated KV-cache scales (``<attention>.k_scale``
and ``v_scale``, an older ``kv_scale`` for both, or ``k_proj.output_scale`` and
``v_proj.output_scale``) become their attention layer's scales of an FP8 KV cache (the
cache holds ``k / k_scale``), as in vLLM; a scale per head is taken at its largest (the
cache has one per layer); layers without one keep 1.0.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kernels.fp8 import FP8_DTYPE
from worker_svc.layers.quantization import FP8_LINEAR_NAMES, Fp8Linear, quantize_per_row

logger = logging.getLogger(__name__)

# quant_method values read here.
FP8_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8")
# Scales of a stored weight (``<layer>.<name>``).
_WEIGHT_SCALE_NAMES = ("weight_scale", "weight_scale_inv")
# Stored tensors that are not used (see the module docstring).
_UNUSED_NAMES = ("input_scale", "input_scale_ub", "output_scale", "q_scale", "prob_scale")
# KV-cache scales of an attention layer (``<attention>.<name>``).
_KV_SCALE_NAMES = ("k_scale", "v_scale", "kv_scale")
# The same, stored as the output scales of the k and v projections.
_KV_OUTPUT_SCALES = {"k_proj": "k_scale", "v_proj": "v_scale"}


@dataclass(frozen=True)
class Fp8Checkpoint:
    """What ``quantization_config`` says of an FP8 checkpoint."""

    # quant_method, one of FP8_METHODS.
    method: str
    # (rows, columns) of a weight-scale tile for block-wise scales, else None.
    block_size: tuple[int, int] | None
    # Layers stored unquantized: names, ``re:`` patterns or shell-style wildcards.
    ignore: tuple[str, ...]
    # False for a checkpoint of float weights that only carries KV-cache scales
    # (compressed-tensors with a ``kv_cache_scheme`` and no ``config_groups``).
    quantizes_weights: bool = True

    def ignores(self, name: str) -> bool:
        """Whether the layer of HF name ``name`` (``model.layers.0.mlp.down_proj``) is
        stored unquantized."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], name):
                    return True
            elif entry == name or ("*" in entry and fnmatch.fnmatchcase(name, entry)):
                return True
        return False


def _names(config: dict, key: str) -> tuple[str, ...]:
    value = config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quantization_config.{key} must be a list of layer names, "
                         f"got {value!r}.")
    return tuple(value)


def _block_size(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in value)):
        raise ValueError(f"quantization_config.{name} must be two positive integers, "
                         f"got {value!r}.")
    return (value[0], value[1])


def _compressed_tensors(config: dict) -> Fp8Checkpoint:
    kv_scheme = config.get("kv_cache_scheme")
    if kv_scheme is not None and (not isinstance(kv_scheme, dict)
                                  or kv_scheme.get("num_bits") != 8
                                  or kv_scheme.get("type") != "float"):
        raise ValueError(f"quantization_config.kv_cache_scheme must be 8-bit float (the "
                         f"scales of an FP8 KV cache) or null, got {kv_scheme!r}.")
    groups = config.get("config_groups")
    if not groups and kv_scheme is not None:  # float weights, calibrated KV-cache scales
        return Fp8Checkpoint("compressed-tensors", None, (), quantizes_weights=False)
    fmt = config.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"quantization_config.format {fmt!r} is not served: gridllm serves "
                         "compressed-tensors checkpoints of 8-bit float weights "
                         "('float-quantized').")
    sparsity = config.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
        raise ValueError(f"quantization_config.sparsity_config.format "
                         f"{sparsity.get('format')!r} is not served: only dense weights.")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config.config_groups must name at least one group "
                         "(or kv_cache_scheme give KV-cache scales alone).")
    block = None
    for group_name, group in groups.items():
        where = f"config_groups.{group_name}"
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"quantization_config.{where}.weights must describe the "
                             "weights' quantization.")
        if weights.get("num_bits") != 8 or weights.get("type") != "float":
            raise ValueError(f"quantization_config.{where}.weights is "
                             f"{weights.get('num_bits')}-bit {weights.get('type')}: gridllm "
                             "serves 8-bit float (e4m3) weights only.")
        if weights.get("symmetric", True) is not True:
            raise ValueError(f"quantization_config.{where}.weights.symmetric must be true "
                             "(e4m3 weights have no zero point).")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"quantization_config.{where}.weights.strategy must be "
                             f"'tensor', 'channel' or 'block', got {strategy!r}.")
        if strategy == "block":
            block = _block_size(weights.get("block_structure"),
                                f"{where}.weights.block_structure")
            if block is None:
                raise ValueError(f"quantization_config.{where}.weights.block_structure is "
                                 "needed with strategy 'block'.")
        activations = group.get("input_activations")
        if activations is not None and (not isinstance(activations, dict)
                                        or activations.get("num_bits") != 8
                                        or activations.get("type") != "float"):
            raise ValueError(f"quantization_config.{where}.input_activations must be "
                             "8-bit float or null.")
    return Fp8Checkpoint("compressed-tensors", block, _names(config, "ignore"))


def fp8_checkpoint(hf_config) -> Fp8Checkpoint | None:
    """The FP8 layout of a checkpoint from its HF config; None when it is not quantized.

    Raises:
        ValueError: a quantized checkpoint of another method or layout, naming the field of
            ``quantization_config``.
    """
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        to_dict = getattr(config, "to_dict", None)
        config = to_dict() if callable(to_dict) else None
        if not isinstance(config, dict):
            raise ValueError("quantization_config must be a JSON object.")
    method = config.get("quant_method")
    if method not in FP8_METHODS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not served: gridllm "
                         f"reads FP8 checkpoints ({', '.join(FP8_METHODS)}) and quantizes "
                         "bf16/fp16/fp32 checkpoints at load with quantization='fp8'.")
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    if method == "fbgemm_fp8":
        return Fp8Checkpoint(method, None, _names(config, "modules_to_not_convert"))
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme must be 'dynamic' or "
                         f"'static', got {scheme!r}.")
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt must be 'e4m3', got {fmt!r}.")
    return Fp8Checkpoint(method, _block_size(config.get("weight_block_size"),
                                             "weight_block_size"),
                         _names(config, "ignored_layers"))


def stores_fp8_weights(checkpoint: Fp8Checkpoint | None) -> bool:
    """Whether a checkpoint's projections are stored in e4m3 (not KV-cache scales alone)."""
    return checkpoint is not None and checkpoint.quantizes_weights


def check_quantization(quantization: str | None, checkpoint: Fp8Checkpoint | None) -> None:
    """ValueError naming ``quantization`` unless it fits the checkpoint: None or ``"fp8"``
    fit any; a checkpoint layout's name (``"compressed-tensors"``, ``"fbgemm_fp8"``, as
    vLLM takes them) needs a checkpoint of that layout."""
    if quantization in (None, "fp8"):
        return
    if checkpoint is None or checkpoint.method != quantization:
        found = ("no quantization_config" if checkpoint is None
                 else f"quant_method {checkpoint.method!r}")
        raise ValueError(f"quantization={quantization!r} names the layout of an FP8 "
                         f"checkpoint, but the checkpoint has {found}; leave quantization "
                         "unset to serve a checkpoint as stored, or set 'fp8' to quantize "
                         "a float checkpoint at load.")


def _hf_parts(model: nn.Module, name: str) -> list[str]:
    """The HF layer names stored for the model's layer ``name``: the parts of a merged
    layer (``...q_proj``, ``...k_proj``, ``...v_proj`` for ``...qkv_proj``), else itself."""
    prefix, _, leaf = name.rpartition(".")
    parts = [hf for hf, (merged, _) in getattr(model, "_STACKED", {}).items()
             if merged == leaf]
    return [f"{prefix}.{part}" for part in parts] if parts else [name]


def prepare_fp8_layers(model: nn.Module, checkpoint: Fp8Checkpoint,
                       device: torch.device | None = None) -> set[str]:
    """Replace the decoder's linear layers stored in e4m3 by empty ``Fp8Linear`` layers of
    the same shape on ``device`` (default: the linear layer's), before the checkpoint is
    loaded into ``model``; the linear layers may be on the meta device (never allocated).

    Args:
        checkpoint: one that ``stores_fp8_weights``, or ``AT_LOAD``.
    Returns:
        The HF names of the layers now held in e4m3 (``model.layers.0.self_attn.q_proj``).
    Raises:
        ValueError: a model outside the Llama family, or a merged layer whose parts are
            stored some quantized, some not.
    """
    targets = [(f"{prefix}.{name}" if prefix else name, module, name)
               for prefix, module in model.named_modules()
               for name, child in module.named_children()
               if name in FP8_LINEAR_NAMES and isinstance(child, nn.Linear)]
    missing = set(FP8_LINEAR_NAMES) - {name for _, _, name in targets}
    if missing:
        raise ValueError(f"quantization='fp8' supports the Llama family (linear layers "
                         f"{', '.join(FP8_LINEAR_NAMES)}), and so do FP8 checkpoints; "
                         f"{type(model).__name__} has no {', '.join(sorted(missing))}.")
    held: set[str] = set()
    for full_name, module, name in targets:
        parts = _hf_parts(model, full_name)
        ignored = [checkpoint.ignores(part) for part in parts]
        if all(ignored):
            continue
        if any(ignored):
            raise ValueError(f"quantization_config keeps {parts[ignored.index(True)]!r} "
                             f"unquantized but not {parts[ignored.index(False)]!r}: gridllm "
                             f"holds them as one layer ({full_name}).")
        setattr(module, name, _empty_fp8_linear(getattr(module, name), device))
        held.update(parts)
    logger.info("FP8 weights (%s): %d linear layers hold float8_e4m3fn weights",
                checkpoint.method, len(held))
    return held


# What quantization="fp8" makes of a float checkpoint: every decoder projection in e4m3.
AT_LOAD = Fp8Checkpoint("quantized at load", None, ())


def quantized_at_load(weights: Iterable[tuple[str, torch.Tensor]], held: set[str],
                      dtype: torch.dtype, device: torch.device
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """A float checkpoint's tensors with each held layer's weight quantized as it streams
    by (``quantize_per_row`` of the weight in the model's ``dtype`` on ``device``, the
    values ``Fp8Linear.from_linear`` gives a loaded layer): a part of a merged layer is
    whole rows of it, so it quantizes alone, and no layer is ever held in ``dtype``."""
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in held:
            weight, scale = quantize_per_row(tensor.to(device=device, dtype=dtype))
            yield name, weight
            yield f"{prefix}.weight_scale", scale[:, 0].contiguous()
        else:
            yield name, tensor


def _empty_fp8_linear(linear: nn.Linear, device: torch.device | None) -> Fp8Linear:
    """An ``Fp8Linear`` of ``linear``'s shape on ``device`` whose weight, scales and bias
    the checkpoint fills; a tensor-parallel shard's parameters are cut as ``linear``'s
    are."""
    weight = linear.weight
    device = device or weight.device
    tp = getattr(linear, "tp", None)
    is_row_parallel = getattr(linear, "is_row_parallel", False)
    reduce = tp.all_reduce if tp is not None and tp.is_parallel and is_row_parallel else None
    bias = None if linear.bias is None else torch.empty(linear.bias.shape,
                                                        dtype=linear.bias.dtype, device=device)
    layer = Fp8Linear(torch.empty(weight.shape, dtype=FP8_DTYPE, device=device),
                      torch.empty(weight.shape[0], dtype=torch.float32, device=device),
                      bias, reduce)
    spec = getattr(weight, "tp_shard", None)
    if spec is not None:
        layer.weight.tp_shard = spec  # type: ignore[attr-defined]
        if spec.dim == 0:  # the scales follow the rows a column-parallel shard keeps
            layer.weight_scale.tp_shard = spec  # type: ignore[attr-defined]
    bias_spec = getattr(linear.bias, "tp_shard", None)
    if bias_spec is not None:
        layer.bias.tp_shard = bias_spec  # type: ignore[union-attr]
    # A row-parallel layer adds its (replicated) bias on rank 0 only (finish_fp8_layers).
    layer.drops_bias = bool(reduce is not None and tp.rank != 0)
    return layer


def finish_fp8_layers(model: nn.Module, kv_scales: dict[str, dict[str, float]]) -> None:
    """After loading: a row-parallel shard's bias stays on rank 0 only (as
    ``Fp8Linear.from_linear`` leaves it), and each attention layer with stored KV-cache
    scales (``kv_scales`` as ``fp8_checkpoint_weights`` collected them) takes them.

    Raises:
        ValueError: KV-cache scales stored for a module that is no attention layer.
    """
    for module in model.modules():
        if isinstance(module, Fp8Linear) and getattr(module, "drops_bias", False):
            module.bias = None
    for prefix, scales in kv_scales.items():
        try:
            attention = model.get_submodule(prefix)
        except AttributeError:
            attention = None
        if attention is None or not hasattr(attention, "kv_scales"):
            raise ValueError(f"checkpoint tensor {prefix + '.' + next(iter(scales))!r} is a "
                             f"KV-cache scale, but {prefix!r} is no attention layer of "
                             f"{type(model).__name__}.")
        both = scales.get("kv_scale", 1.0)
        attention.kv_scales = (scales.get("k_scale", both), scales.get("v_scale", both))
    if kv_scales:
        logger.info("FP8 checkpoint: calibrated KV-cache scales for %d attention layers",
                    len(kv_scales))


def _kv_scale(name: str, tensor: torch.Tensor) -> float:
    """A stored KV-cache scale as one float: the largest of a per-head scale."""
    values = tensor.float().flatten()
    if values.numel() == 0 or not bool(torch.isfinite(values).all()) \
            or not bool((values > 0).all()):
        raise ValueError(f"checkpoint tensor {name!r} must hold positive finite KV-cache "
                         f"scales, got {values.tolist()[:8]}.")
    return float(values.max())


def _row_scales(name: str, weight: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] | None) -> torch.Tensor:
    """``[rows, columns]`` float32 scales of the stored ``weight`` (per tensor, per row or
    per block), broadcast over its elements."""
    rows, cols = weight.shape
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError(f"checkpoint tensor {name!r} must hold finite, non-negative "
                         "scales.")
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, 1)
    if scale.numel() == rows and scale.shape in ((rows,), (rows, 1)):
        return scale.reshape(rows, 1)
    if block is not None and scale.shape == (-(-rows // block[0]), -(-cols // block[1])):
        return (scale.repeat_interleave(block[0], 0)[:rows]
                .repeat_interleave(block[1], 1)[:, :cols])
    expected = "one value, one per row"
    if block is not None:
        expected += f" or one per {block[0]} x {block[1]} block"
    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(scale.shape)}: expected "
                     f"{expected} of a [{rows}, {cols}] weight.")


def _stored_pair(prefix: str, weight: torch.Tensor, scale: torch.Tensor, scale_name: str,
                 checkpoint: Fp8Checkpoint, held: set[str]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``load_weights`` takes for one stored e4m3 weight and its scale."""
    if weight.dim() != 2:
        raise ValueError(f"checkpoint tensor {prefix + '.weight'!r} is float8_e4m3fn with "
                         f"shape {tuple(weight.shape)}: expected a [rows, columns] weight.")
    scales = _row_scales(f"{prefix}.{scale_name}", weight, scale, checkpoint.block_size)
    if prefix not in held:
        yield f"{prefix}.weight", weight.float() * scales
    elif scales.shape[1] == 1:
        yield f"{prefix}.weight", weight
        yield f"{prefix}.weight_scale", scales[:, 0].contiguous()
    else:  # block-wise: one more rounding, to per-channel scales
        weight, row_scale = quantize_per_row(weight.float() * scales)
        yield f"{prefix}.weight", weight
        yield f"{prefix}.weight_scale", row_scale[:, 0].contiguous()


def fp8_checkpoint_weights(weights: Iterable[tuple[str, torch.Tensor]],
                           checkpoint: Fp8Checkpoint, held: set[str],
                           kv_scales: dict[str, dict[str, float]]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model prepared by ``prepare_fp8_layers`` loads them:
    a held layer's e4m3 weight and ``[rows]`` float32 scales, any other e4m3 weight
    dequantized to float32 (the model's parameters take their own dtype), unused scales
    dropped, every other tensor as stored. KV-cache scales go into ``kv_scales``
    (attention layer name -> ``{"k_scale": ..., "v_scale": ...}``) for
    ``finish_fp8_layers``.

    Raises:
        ValueError: an e4m3 weight without its scale or the reverse, a scale of a shape
            that fits no layout, a held layer stored in another dtype, or a float8 format
            other than e4m3 - each naming the tensor.
    """
    weights_waiting: dict[str, torch.Tensor] = {}
    scales_waiting: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        owner, _, projection = prefix.rpartition(".")
        if leaf == "output_scale" and projection in _KV_OUTPUT_SCALES:
            kv_scales.setdefault(owner, {})[_KV_OUTPUT_SCALES[projection]] = \
                _kv_scale(name, tensor)
            continue
        if leaf in _KV_SCALE_NAMES:
            kv_scales.setdefault(prefix, {})[leaf] = _kv_scale(name, tensor)
            continue
        if leaf in _UNUSED_NAMES:
            continue
        if tensor.dtype in (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
            raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype}: gridllm serves "
                             "float8_e4m3fn weights.")
        if leaf in _WEIGHT_SCALE_NAMES:
            if prefix in weights_waiting:
                yield from _stored_pair(prefix, weights_waiting.pop(prefix), tensor, leaf,
                                        checkpoint, held)
            else:
                scales_waiting[prefix] = (leaf, tensor)
        elif leaf == "weight" and tensor.dtype == FP8_DTYPE:
            if prefix in scales_waiting:
                scale_name, scale = scales_waiting.pop(prefix)
                yield from _stored_pair(prefix, tensor, scale, scale_name, checkpoint, held)
            else:
                weights_waiting[prefix] = tensor
        elif leaf == "weight" and prefix in held:
            raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype}, but "
                             "quantization_config says the layer is stored in e4m3 (list "
                             "the layers stored unquantized in its ignore list).")
        else:
            yield name, tensor
    if weights_waiting:
        raise ValueError(f"checkpoint tensor {next(iter(weights_waiting)) + '.weight'!r} is "
                         "float8_e4m3fn but the checkpoint has no weight_scale for it.")
    if scales_waiting:
        prefix, (leaf, _) = next(iter(scales_waiting.items()))
        raise ValueError(f"checkpoint tensor {prefix + '.' + leaf!r} scales no "
                         "float8_e4m3fn weight.")
