"""Per-token cost of incremental detokenization (the router runs it for every streamed token):
the tokenizers library's streaming decoder against decoding a window of tokens twice.

    python benchmarks/detokenize.py [--tokenizer DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The repository's packages, not benchmarks/kernels.py, under the names they import.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gridllm.common.detokenizer import IncrementalDetokenizer  # noqa: E402
from gridllm.common.sampling_params import SamplingParams  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. café naïve 日本語 🙂 — " * 40


def cost_per_token(tokenizer, ids: list[int], prompt_ids: list[int], use_stream: bool,
                   repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["zzz"]))
        if not use_stream:
            detokenizer._stream = None
        start = time.perf_counter()
        for token_id in ids:
            detokenizer.update([token_id])
            detokenizer.get_delta(False)
        detokenizer.get_delta(True)
        best = min(best, time.perf_counter() - start)
    assert detokenizer.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    return best / len(ids)


def main() -> None:
    from transformers import AutoTokenizer

    from gridllm.common.presets import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=os.path.join(cache_dir(), "smollm2-135m"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tokenizer.encode(TEXT)
    prompt_ids = tokenizer.encode("Once upon a time")
    for name, use_stream in (("DecodeStream", True), ("window decode x2", False)):
        seconds = cost_per_token(tokenizer, ids, prompt_ids, use_stream, args.repeats)
        print(f"{name}: {seconds * 1e6:.1f} us per token ({len(ids)} tokens)")


if __name__ == "__main__":
    main()
