"""Model registry: HF ``architectures[0]`` -> gridllm model class."""

from __future__ import annotations

import importlib

# architecture name -> (module, class); imported lazily so one broken file can't hide the rest.
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def sharded_architectures() -> list[str]:
    """The architectures that can run with tensor_parallel_size > 1."""
    return [a for a in supported_architectures()
            if getattr(get_model_class(a), "supports_tensor_parallel", False)]


def get_model_class(architecture: str):
    """Return the model class for an HF architecture name.

    Raises:
        ValueError: the architecture is not supported (the message lists those that are).
    """
    if architecture not in _MODELS:
        raise ValueError(f"model architecture {architecture!r} is not supported; supported "
                         f"architectures: {supported_architectures()}.")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(f"worker_svc.models.{module}"), name)
