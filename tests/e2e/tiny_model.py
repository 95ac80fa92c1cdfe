"""A tiny random-weight Llama with a small real tokenizer (byte-level BPE, chat template).

The tokenizer is trained here in a fraction of a second, so the services can tokenize,
apply a chat template and detokenize (multi-byte characters span several tokens).
"""

from __future__ import annotations

import os

from tests.worker_svc.tiny_models import _COMMON, make_tiny_model

# Ids fixed by the model config of tests.worker_svc.tiny_models (bos 0, eos 1).
MAX_MODEL_LEN = 4096
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a tiny model.",
    "Hello world, hello gridllm! It streams tokens over gRPC to every client.",
    "café naïve déjà vu 日本語 🙂 — multi-byte characters span several byte tokens.",
]


def build_tokenizer(path: str) -> None:
    """Train a byte-level BPE whose vocabulary fills the tiny model's and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_COMMON["vocab_size"], special_tokens=_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=_SPECIAL_TOKENS[0],
                                   eos_token=_SPECIAL_TOKENS[1], pad_token=_SPECIAL_TOKENS[0])
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_served_model(path, max_model_len: int = MAX_MODEL_LEN) -> str:
    """Tiny random Llama (vocab 320) plus tokenizer in ``path``.

    ``max_model_len`` is raised from the tiny config's 256 so a request can run long
    enough (thousands of steps) for cancellation and deadlines to land mid-stream.
    """
    import json

    make_tiny_model("llama", path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["max_position_embeddings"] = max_model_len
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    build_tokenizer(str(path))
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    return str(path)
