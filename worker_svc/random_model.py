"""Build a ``random:<preset>`` model: the in-code config, random weights made on the device.

Nothing is materialised on the CPU first: the modules are created under
``torch.device(device)`` with the default dtype set to the target dtype, and each
parameter is filled in place, so an 8B model in bf16 needs only its 16 GB on the GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gridllm.common.random_presets import random_model_config
from worker_svc.layers.attention import AttentionBackend
from worker_svc.models import get_model_class
from worker_svc.parallel.sharding import check_tensor_parallel
from worker_svc.parallel.state import building, state_for
from worker_svc.torch_utils import default_dtype, skip_init

logger = logging.getLogger(__name__)

# Standard deviation of the random weights: small, as in a freshly initialised
# transformer, so activations stay finite in bf16 over many layers.
INIT_STD = 0.02


def build_random_model(name: str, backend: AttentionBackend, device: torch.device,
                       dtype: torch.dtype, seed: int = 0, tensor_parallel_size: int = 1
                       ) -> tuple[nn.Module, object]:
    """Build ``random:<preset>`` with random weights on ``device``.

    Args:
        name: ``random:llama3-8b``, ``random:qwen3-0.6b`` or ``random:tiny``.
        backend: attention backend for the layers.
        device, dtype: where and in what dtype the weights are made.
        seed: seed of the weight generator (same seed, same device: same weights).
        tensor_parallel_size: > 1 builds this rank's shard of the same weights.
    Returns:
        ``(model, hf_config)``; the model is in eval mode.
    """
    hf_config = random_model_config(name)
    model_cls = get_model_class(hf_config.architectures[0])
    check_tensor_parallel(hf_config, hf_config.architectures[0], model_cls,
                          tensor_parallel_size)
    with (default_dtype(dtype), torch.device(device), skip_init(),
          building(state_for(tensor_parallel_size))):
        model = model_cls(hf_config, backend)
    init_random_weights(model, device, seed)
    model.eval()
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("built %s (%s) with random weights on %s as %s: %.2f GB", name,
                hf_config.architectures[0], device, dtype, num_bytes / 1e9)
    return model, hf_config


@torch.no_grad()
def init_random_weights(model: nn.Module, device: torch.device, seed: int = 0) -> None:
    """Fill every parameter in place: norm scales 1, biases 0, matrices N(0, INIT_STD).

    A tensor-parallel rank draws each sharded matrix whole and keeps its slice, so the
    ranks together hold the weights the single-device model gets from the same seed.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            # 1-D parameters are norm scales (start at 1) or biases (start at 0).
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        shard = getattr(param, "tp_shard", None)
        if shard is None:
            param.normal_(0.0, INIT_STD, generator=generator)
        else:
            full = torch.empty(shard.full_shape(param.shape), dtype=param.dtype, device=device)
            param.copy_(shard.take(full.normal_(0.0, INIT_STD, generator=generator)))
