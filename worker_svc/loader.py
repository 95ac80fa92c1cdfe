"""Build a model from an HF directory (safetensors, sharded or not, or pytorch_model.bin)
or a GGUF file, on the requested device and dtype."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterator

import torch

from gridllm.common.config import ModelConfig
from gridllm.common.presets import resolve_model
from worker_svc.layers.attention import AttentionBackend
from worker_svc.layers.fp8_checkpoint import (
    AT_LOAD,
    check_quantization,
    finish_fp8_layers,
    fp8_checkpoint,
    fp8_checkpoint_weights,
    prepare_fp8_layers,
    quantized_at_load,
    stores_fp8_weights,
)
from worker_svc.layers.quantization import quantize_weights
from worker_svc.layers.selector import get_attention_backend
from worker_svc.models import get_model_class
from worker_svc.parallel.layers import ColumnParallelLinear, RowParallelLinear
from worker_svc.parallel.sharding import check_tensor_parallel
from worker_svc.parallel.state import building, state_for
from worker_svc.torch_utils import default_dtype, resolve_device, resolve_dtype, skip_init

logger = logging.getLogger(__name__)

def resolve_model_path(name: str) -> str:
    """``resolve_model`` that converts a GGUF preset into its cached HF directory once."""
    from worker_svc.gguf_loader import convert_gguf_to_hf

    return resolve_model(name, convert_gguf_to_hf)


def load_model(model_config: ModelConfig, backend: AttentionBackend | None = None,
               device: torch.device | None = None):
    """Load the model named by ``model_config.model``.

    Args:
        model_config: model path (HF directory, ``.gguf`` file or preset name), dtype, device.
        backend: attention backend for the layers (default: ``model_config.attention_backend``).
        device: overrides ``model_config.device``.
    Returns:
        ``(model, hf_config)``; the model is in eval mode on ``device`` (with
        ``tensor_parallel_size`` > 1: this rank's shard). An FP8 checkpoint
        (``quantization_config``, see ``worker_svc.layers.fp8_checkpoint``) is served with
        its stored e4m3 weights (and calibrated KV-cache scales), whatever
        ``model_config.quantization`` says.
    Raises:
        ValueError: the path does not exist, the architecture is not supported, it
            cannot be split ``tensor_parallel_size`` ways, or its quantization is not one
            gridllm serves.
    """
    path = resolve_model_path(model_config.model)
    device = device or resolve_device(model_config.device)
    dtype = resolve_dtype(model_config.dtype, device)
    # Only "fp8" quantizes at load; the other names check an FP8 checkpoint's layout.
    at_load = "fp8" if model_config.quantization == "fp8" else None
    if path.startswith("random:"):
        # Random-weight presets (gridllm/random_presets.py): built on the device, no checkpoint.
        from worker_svc.random_model import build_random_model

        backend = backend or get_attention_backend(model_config.attention_backend, device,
                                                   model_config.sparse_attention)
        model, hf_config = build_random_model(path, backend, device, dtype,
                                              model_config.seed or 0,
                                              model_config.tensor_parallel_size)
        check_quantization(model_config.quantization, None)
        quantize_weights(model, at_load)
        return model, hf_config
    hf_config, weights = read_checkpoint(path, dtype)
    checkpoint = fp8_checkpoint(hf_config)
    check_quantization(model_config.quantization, checkpoint)
    architectures = getattr(hf_config, "architectures", None) or [None]
    model_cls = get_model_class(architectures[0])
    tp_size = model_config.tensor_parallel_size
    check_tensor_parallel(hf_config, architectures[0], model_cls, tp_size)
    backend = backend or get_attention_backend(model_config.attention_backend, device,
                                               model_config.sparse_attention)
    # FP8 projections (an FP8 checkpoint's, or quantization="fp8" of a float one) are never
    # built in the model's dtype: they would take twice or four times their e4m3 bytes of
    # device memory before being replaced.
    stored_fp8 = stores_fp8_weights(checkpoint)
    fp8 = stored_fp8 or at_load == "fp8"
    with (default_dtype(dtype), torch.device(device), skip_init(),
          building(state_for(tp_size)),
          parallel_linears_on_meta() if fp8 else contextlib.nullcontext()):
        model = model_cls(hf_config, backend)
    held: set[str] = set()
    if fp8:
        held = prepare_fp8_layers(model, checkpoint if stored_fp8 else AT_LOAD, device)
        materialize_meta(model, device)  # the projections kept in the model's dtype
    kv_scales: dict[str, dict[str, float]] = {}
    if checkpoint is not None:  # an FP8 checkpoint, or KV-cache scales alone
        weights = fp8_checkpoint_weights(weights, checkpoint, held if stored_fp8 else set(),
                                         kv_scales)
    if fp8 and not stored_fp8:  # float weights, quantized as they stream by
        weights = quantized_at_load(weights, held, dtype, device)
    model.load_weights(weights)
    finish_fp8_layers(model, kv_scales)
    model.eval()
    logger.info("loaded %s (%s) on %s as %s", path, architectures[0], device, dtype)
    return model, hf_config


@contextlib.contextmanager
def parallel_linears_on_meta():
    """Build every column- and row-parallel linear layer (the decoder's projections) on
    the meta device: no memory until ``prepare_fp8_layers`` replaces them or
    ``materialize_meta`` allocates what stays."""
    classes = (ColumnParallelLinear, RowParallelLinear)
    saved = {cls: cls.__init__ for cls in classes}

    def on_meta(init):
        def __init__(self, *args, **kwargs):
            with torch.device("meta"):
                init(self, *args, **kwargs)
        return __init__

    for cls in classes:
        cls.__init__ = on_meta(saved[cls])
    try:
        yield
    finally:
        for cls, init in saved.items():
            cls.__init__ = init


def materialize_meta(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized, on ``device``) every parameter and buffer of ``model``
    still on the meta device, keeping a parameter's attributes (a tensor-parallel shard's
    ``tp_shard``); their values come from the checkpoint."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                allocated = torch.nn.Parameter(torch.empty_like(param, device=device),
                                               requires_grad=param.requires_grad)
                allocated.__dict__.update(param.__dict__)
                module._parameters[name] = allocated
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def read_checkpoint(path: str, dtype: torch.dtype | None = None):
    """Returns ``(hf_config, iterable of (hf_name, tensor))`` for a directory or GGUF file."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        from worker_svc.gguf_loader import load_gguf

        config, tensors = load_gguf(path, dtype)
        return config, tensors.items()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model {path!r} not found: expected a preset name, an HF directory "
                         "with config.json or a .gguf file.")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path), iter_hf_weights(path)


def iter_hf_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from safetensors (sharded or not) or pytorch_model.bin."""
    files = _weight_files(directory, "model.safetensors")
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    files = _weight_files(directory, "pytorch_model.bin")
    if not files:
        raise ValueError(f"model {directory!r} has no *.safetensors or pytorch_model.bin weights.")
    for file in files:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _weight_files(directory: str, single: str) -> list[str]:
    index = os.path.join(directory, single + ".index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    if os.path.isfile(os.path.join(directory, single)):
        return [os.path.join(directory, single)]
    if single.endswith(".safetensors"):
        return sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return []
