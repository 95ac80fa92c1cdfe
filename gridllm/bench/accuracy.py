"""How much FP8 weights or an FP8 KV cache change a model's predictions, against
transformers in float32 (and transformers' own bfloat16 difference next to it).

    gridllm bench accuracy --model DIR --quantization fp8 --kv-cache-dtype fp8
    gridllm bench accuracy --model smollm2-135m --kv-cache-dtype fp8 --calculate-kv-scales

transformers fp32 generates a greedy continuation of each prompt; gridllm, once as the
model's own dtype and once with the settings given, then predicts every next token along
it (teacher-forced: one prefill, then one decode step per token, so both attention paths
read the cache; ``gridllm.bench.quant_accuracy``). Per row: top-1 agreement with fp32,
the largest logit error, and the mean KL divergence from fp32's next-token distribution.
The prompts are 16 short texts of several kinds (``--prompts-file``: one per line), or,
for a model without a tokenizer, seeded random token ids. Needs a checkpoint transformers
can load (not ``random:`` presets); runs on ``--device`` (transformers too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from gridllm.bench.report import write_json
from gridllm.common.config import KV_CACHE_DTYPES, QUANTIZATIONS

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "SELECT name, COUNT(*) FROM orders",
    "In 1969, the first humans to walk on the Moon were",
    "To make a cup of tea, first",
    "The derivative of x^3 is",
    "Photosynthesis is the process by which",
    "import torch\nx = torch.randn(",
    "The largest planet in the solar system is",
    "Dear hiring manager, I am writing to",
    "The French word for cat is",
    "A haiku about autumn:\n",
    "The GDP of a country measures",
)
# Without a tokenizer: this many prompts of this many seeded random token ids.
NUM_RANDOM_PROMPTS = 8
RANDOM_PROMPT_LEN = 12


@dataclass
class AccuracyConfig:
    model: str
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    # gridllm's dtype for both of its rows (float32: the quantization's cost alone).
    dtype: str = "float32"
    device: str = "cpu"
    num_new: int = 16
    # None: DEFAULT_PROMPTS (or random ids without a tokenizer).
    prompts: list[str] | None = None

    def __post_init__(self) -> None:
        from gridllm.common.config import require

        require(not self.model.startswith("random:"), "model",
                "must be a checkpoint transformers can load, not a random: preset", self.model)
        require(isinstance(self.num_new, int) and self.num_new >= 1, "num_new",
                "must be at least 1", self.num_new)
        require(self.prompts is None or len(self.prompts) > 0, "prompts",
                "must hold at least one prompt", self.prompts)


def _prompt_ids(config: AccuracyConfig, model_dir: str, vocab_size: int) -> list[list[int]]:
    import torch

    from gridllm.common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(2, vocab_size, (RANDOM_PROMPT_LEN,), generator=generator).tolist()
                for _ in range(NUM_RANDOM_PROMPTS)]
    texts = config.prompts or DEFAULT_PROMPTS
    ids = [tokenizer(text).input_ids for text in texts]
    empty = [text for text, i in zip(texts, ids, strict=True) if not i]
    if empty:
        raise ValueError(f"prompts must each tokenize to at least one token, got {empty!r}.")
    return ids


def _runner(config: AccuracyConfig, max_model_len: int, num_seqs: int, quantized: bool):
    """A model runner of ``config.model`` in ``config.dtype``; ``quantized``: with the
    config's quantization and KV cache settings."""
    from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
    from worker_svc.model_runner import ModelRunner

    cache = (CacheConfig(num_kv_blocks=4, kv_cache_dtype=config.kv_cache_dtype,
                         calculate_kv_scales=config.calculate_kv_scales)
             if quantized else CacheConfig(num_kv_blocks=4))
    return ModelRunner(
        ModelConfig(config.model, device=config.device, dtype=config.dtype, enforce_eager=True,
                    max_model_len=max_model_len,
                    quantization=config.quantization if quantized else None),
        cache, SchedulerConfig(max_num_seqs=num_seqs,
                               max_num_batched_tokens=max(2048, max_model_len)))


def run_accuracy(config: AccuracyConfig) -> dict[str, Any]:
    """The rows (transformers bf16; gridllm in ``dtype``; gridllm with the settings) as
    dicts of ``variant``, ``top1_agreement``, ``max_logit_error``, ``mean_kl``."""
    from transformers import AutoConfig

    from gridllm.bench.quant_accuracy import (
        measure_bf16,
        measure_model,
        reference_cases,
        result_row,
    )
    from worker_svc.loader import resolve_model_path

    model_dir = resolve_model_path(config.model)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    cases = reference_cases(model_dir, _prompt_ids(config, model_dir, vocab_size),
                            config.num_new, config.device)
    max_model_len = max(len(case.seq) for case in cases)

    def row(name: str, runner) -> dict[str, Any]:
        return result_row(name, measure_model(runner.model, cases, runner.kv_cache_dtype,
                                              config.num_new))

    rows = [result_row("transformers bfloat16", measure_bf16(cases)),
            row(f"gridllm {config.dtype}", _runner(config, max_model_len, len(cases), False))]
    settings = [f"quantization={config.quantization}"] if config.quantization else []
    if config.kv_cache_dtype != "auto":
        settings.append(f"kv_cache_dtype={config.kv_cache_dtype}")
    if config.calculate_kv_scales:
        settings.append("calculate_kv_scales")
    if settings:
        rows.append(row(f"gridllm {config.dtype}, {', '.join(settings)}",
                        _runner(config, max_model_len, len(cases), True)))
    return {"model": config.model, "device": config.device, "num_prompts": len(cases),
            "num_new": config.num_new, "rows": rows}


def format_result(result: dict[str, Any]) -> str:
    from gridllm.bench.quant_accuracy import format_rows

    return (f"{result['model']} on {result['device']}: {result['num_prompts']} prompts x "
            f"{result['num_new']} teacher-forced predictions against transformers float32\n"
            + format_rows(result["rows"]))


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset or HF directory (not random:)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--calculate-kv-scales", action="store_true",
                   help="with an FP8 KV cache: scales computed at load")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="gridllm's dtype (float32: the quantization's cost alone)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--num-new", type=int, default=16, help="predictions a prompt")
    p.add_argument("--prompts-file", default=None, help="prompts, one a line")
    p.add_argument("--output", default=None, help="write the result as JSON here")


def cmd_accuracy(args: argparse.Namespace) -> int:
    prompts = None
    if args.prompts_file is not None:
        with open(args.prompts_file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    config = AccuracyConfig(model=args.model, quantization=args.quantization,
                            kv_cache_dtype=args.kv_cache_dtype,
                            calculate_kv_scales=args.calculate_kv_scales, dtype=args.dtype,
                            device=args.device, num_new=args.num_new, prompts=prompts)
    result = run_accuracy(config)
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0
