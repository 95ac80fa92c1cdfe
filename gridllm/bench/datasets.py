"""Random benchmark dataset: token-id prompts with input/output lengths in given ranges."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    # Tokens to generate (the request runs with max_tokens = output_len and ignore_eos).
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"100:1024"`` -> ``(100, 1024)``; a single number ``"128"`` -> ``(128, 128)``.

    Raises:
        ValueError: not ``LOW:HIGH`` with ``1 <= LOW <= HIGH`` (names the flag ``name``).
    """
    parts = str(text).split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}.")
    return low, high


def random_requests(num_prompts: int, input_len_range: tuple[int, int],
                    output_len_range: tuple[int, int], vocab_size: int, *, seed: int = 0,
                    excluded_token_ids: Iterable[int] = ()) -> list[BenchRequest]:
    """``num_prompts`` requests with lengths uniform in the (inclusive) ranges.

    Args:
        num_prompts: how many requests.
        input_len_range, output_len_range: inclusive ``(low, high)`` token counts.
        vocab_size: token ids are drawn uniformly from ``[0, vocab_size)``...
        seed: same seed, same requests.
        excluded_token_ids: ...minus these (special tokens such as BOS/EOS).
    Returns:
        The requests, in a fixed (seeded) order.
    Raises:
        ValueError: a count or range is out of bounds.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}.")
    for name, (low, high) in (("input_len_range", input_len_range),
                              ("output_len_range", output_len_range)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must satisfy 1 <= low <= high, got {(low, high)}.")
    excluded = np.unique(np.asarray(list(excluded_token_ids), dtype=np.int64))
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), excluded)
    if allowed.size == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no token id once special ids are "
                         "excluded.")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(input_len_range[0], input_len_range[1] + 1, size=num_prompts)
    output_lens = rng.integers(output_len_range[0], output_len_range[1] + 1, size=num_prompts)
    return [BenchRequest(allowed[rng.integers(0, allowed.size, size=int(n))].tolist(), int(m))
            for n, m in zip(input_lens, output_lens, strict=False)]


def special_token_ids(tokenizer, hf_config=None) -> list[int]:
    """Ids a random prompt should avoid: the tokenizer's special ids and the config's
    BOS/EOS/PAD (random models have no tokenizer but their configs name them)."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(int(t) for t in getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_config, attr, None) if hf_config is not None else None
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None:
                ids.add(int(token_id))
    return sorted(ids)
