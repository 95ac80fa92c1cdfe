"""GGUF files -> HF config + dequantized, HF-named tensors.

Goes through transformers' own GGUF utilities so names, config fields and the llama.cpp
Q/K row permutation are undone exactly as ``from_pretrained(..., gguf_file=...)`` does.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def load_gguf(path: str, dtype: torch.dtype | None = None):
    """Read a GGUF file.

    Args:
        path: the ``.gguf`` file.
        dtype: cast dequantized tensors to this dtype while reading (saves memory).
    Returns:
        ``(hf_config, weights)`` where ``weights`` is a dict ``hf_name -> tensor`` (CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, filename = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    # transformers maps GGUF tensor names through a (weightless) model of the architecture.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # GGUF metadata names no HF architecture; the registry keys on it.
    config.architectures = [type(skeleton).__name__]
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=dtype)
    logger.info("read %d tensors from %s", len(parsed["tensors"]), path)
    return config, parsed["tensors"]
