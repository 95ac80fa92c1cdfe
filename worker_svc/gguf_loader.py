"""GGUF files -> HF config + dequantized, HF-named tensors.

Goes through transformers' own GGUF utilities so names, config fields and the llama.cpp
Q/K row permutation are undone exactly as ``from_pretrained(..., gguf_file=...)`` does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from gridllm.common.presets import DONE_MARKER

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


def convert_gguf_to_hf(gguf_path: str, target: str) -> None:
    """Dequantize ``gguf_path`` into an HF directory at ``target``, atomically."""
    from safetensors.torch import save_file

    logger.info("converting %s into %s (once)", gguf_path, target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        # transformers refuses to save_pretrained a GGUF-loaded model, so the dequantized
        # tensors (float32, already un-permuted) are written directly.
        config, tensors = load_gguf(gguf_path)
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _save_tokenizer(gguf_path, tmp)
        open(os.path.join(tmp, DONE_MARKER), "w").close()
        os.chmod(tmp, 0o755)
        if os.path.isfile(os.path.join(target, DONE_MARKER)):
            # Another process finished first; its copy is as good as ours.
            return
        if os.path.isdir(target):
            # A leftover without the marker is an interrupted conversion.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, DONE_MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(gguf_path: str, target: str) -> None:
    """Tokenizer files (chat template included) rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    directory, filename = os.path.split(gguf_path)
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(target)
