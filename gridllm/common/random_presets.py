"""Random-weight model presets for speed runs: ``random:<name>`` needs no download.

The configs are written in code with the shapes of real checkpoints; the loader builds the
model from them and fills the weights with small random values directly on the target
device in the target dtype (see ``worker_svc/random_model.py``). Random models have no
tokenizer: prompts are token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PREFIX = "random:"


def _llama3_8b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"])


def _qwen3_0_6b() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False, bos_token_id=151643, eos_token_id=151645,
        architectures=["Qwen3ForCausalLM"])


def _tiny() -> Any:
    from transformers import LlamaConfig

    # Small enough for CPU tests; long enough a context for the default length ranges.
    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])


RANDOM_PRESETS: dict[str, Callable[[], Any]] = {
    "llama3-8b": _llama3_8b,
    "qwen3-0.6b": _qwen3_0_6b,
    "tiny": _tiny,
}


def is_random_model(name: str) -> bool:
    """Whether ``name`` is a ``random:<preset>`` model name."""
    return isinstance(name, str) and name.startswith(PREFIX)


def random_model_config(name: str) -> Any:
    """The transformers config of ``random:<preset>``.

    Args:
        name: ``random:llama3-8b``, ``random:qwen3-0.6b`` or ``random:tiny``.
    Returns:
        A fresh transformers ``PretrainedConfig`` with ``architectures`` set.
    Raises:
        ValueError: unknown preset (the message lists the known ones).
    """
    key = name[len(PREFIX):] if is_random_model(name) else name
    factory = RANDOM_PRESETS.get(key.lower())
    if factory is None:
        raise ValueError(f"model {name!r}: unknown random preset; known: "
                         f"{[PREFIX + k for k in sorted(RANDOM_PRESETS)]}.")
    from transformers.utils import logging as hf_logging

    # Llama-3-8B keeps max_position_embeddings at the llama3 scaling's original 8192, which
    # transformers flags with a warning on every build; the shape is what is wanted here.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return factory()
    finally:
        hf_logging.set_verbosity(previous)
