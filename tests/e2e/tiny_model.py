"""A tiny random-weight Llama with a small real tokenizer (byte-level BPE, chat template).

The tokenizer is trained here in a fraction of a second, so the services can tokenize,
apply a chat template and detokenize (multi-byte characters span several tokens).
"""

from __future__ import annotations

import os

from tests.worker_svc.tiny_models import _COMMON, make_tiny_model

# Ids fixed by the model config of tests.worker_svc.tiny_models (bos 0, eos 1).
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


def build_tiny_served_model(path) -> str:
    """Tiny random Llama (vocab 320, max_model_len 256) plus tokenizer in ``path``."""
    make_tiny_model("llama", path)
    build_tokenizer(str(path))
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    return str(path)
