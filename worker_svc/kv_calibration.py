"""KV-cache scales computed at load (``calculate_kv_scales``, vLLM's name): for an FP8
cache of a checkpoint that carries no calibrated scales.

Each layer's ``(k_scale, v_scale)`` is the largest |key| and |value| it writes over a fixed
calibration set (``CALIBRATION_TEXTS``, through the model's tokenizer and chat template
where it has them; fixed pseudo-random token ids where it has no tokenizer), divided by
``KV_SCALE_HEADROOM``: one prefill per text over a cache in the model's dtype, before the
KV cache is sized and CUDA graphs are captured (the scales are constants of every kernel
launch, so graphs capture them). The set is fixed, not the requests served (vLLM computes
its scales on the fly): a worker's scales, and so its outputs, do not depend on what it
happened to serve first. Under tensor parallelism each rank measures its own heads.

What the scales are for: keys or values outside e4m3's range (past 448 they saturate,
under 2^-9 they round to zero). Inside it e4m3's relative rounding is the same at any
scale, and the choice changes a model's predictions by rounding noise only
(``benchmarks/fp8_kv_scales.py`` on SmolLM2-135M).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from jinja2 import TemplateError

logger = logging.getLogger(__name__)

# ModelRunner (worker_svc.model_runner imports this module).
ModelRunner = Any

# Scale = amax / this: the calibration set's largest key or value lands at 224, half of
# e4m3's 448, so keys and values up to twice as large as any it saw still fit unsaturated
# (an e5m2 cache, +-57344, takes the same scales).
KV_SCALE_HEADROOM = 224.0
# Calibration tokens per text, at most (the texts are shorter with a real tokenizer).
MAX_CALIBRATION_TOKENS = 256
# Without a tokenizer: this many texts of pseudo-random token ids (seeded).
NUM_RANDOM_TEXTS = 4

# Prose, code, figures, dialogue and two other languages: the kinds of text served.
CALIBRATION_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "made books cheap enough for merchants, students and craftsmen to own. Within fifty "
    "years, presses in more than two hundred European cities had printed millions of copies.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n"
    "        else:\n"
    "            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    "Quarterly revenue rose 12.4% to $3,817 million; operating margin was 21.9% (2023: "
    "19.2%). Solve for x: 3x^2 - 7x + 2 = 0 gives x = 2 or x = 1/3.",
    "User: Can you recommend a good way to learn a new language?\n"
    "Assistant: Practise a little every day, speak with native speakers early, and read "
    "things you enjoy. Spaced repetition helps with vocabulary.",
    "Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. "
    "大型语言模型通过预测下一个词来生成文本。",
)


def calibration_prompts(load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                        max_len: int) -> list[list[int]]:
    """The calibration set as token ids, each of 1 to ``max_len`` tokens: every text, and
    the first as a chat message when the tokenizer has a chat template (ids the model's
    vocabulary lacks dropped); without a tokenizer, ``NUM_RANDOM_TEXTS`` seeded
    pseudo-random sequences."""
    max_len = min(max_len, MAX_CALIBRATION_TOKENS)
    tokenizer = load_tokenizer() if load_tokenizer is not None else None
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (max_len,), generator=generator).tolist()
                for _ in range(NUM_RANDOM_TEXTS)]
    prompts = [tokenizer(text).input_ids for text in CALIBRATION_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        try:
            prompts.append(list(tokenizer.apply_chat_template(
                [{"role": "user", "content": CALIBRATION_TEXTS[0]}],
                add_generation_prompt=True, tokenize=True, return_dict=False)))
        except (TemplateError, ValueError) as exc:  # a template that wants other roles
            logger.info("calculate_kv_scales: no chat prompt (%s)", exc)
    prompts = [[i for i in ids if i < vocab_size][:max_len] for ids in prompts]
    return [ids for ids in prompts if ids]


@torch.inference_mode()
def measure_kv_scales(runner: ModelRunner, prompts: list[list[int]]
                      ) -> list[tuple[float, float]]:
    """Per layer ``(k_scale, v_scale)``: the largest |key| / |value| written over
    ``prompts`` (one prefill each, a cache per layer in the model's dtype) over
    ``KV_SCALE_HEADROOM``; a layer that wrote only zeros gets 1.0."""
    num_layers, num_kv_heads, head_dim = runner.kv_geometry()
    longest = max(len(ids) for ids in prompts)
    shape = (-(-longest // runner.block_size), runner.block_size, num_kv_heads, head_dim)
    caches = [(torch.zeros(shape, dtype=runner.dtype, device=runner.device),
               torch.zeros(shape, dtype=runner.dtype, device=runner.device))
              for _ in range(num_layers)]
    amax = torch.zeros(num_layers, 2, dtype=torch.float32, device=runner.device)
    for ids in prompts:  # a longer prompt's stale keys are past a shorter one's length
        runner.dummy_forward(len(ids), caches, token_ids=torch.tensor(
            ids, dtype=torch.int32, device=runner.device))
        seen = torch.stack([torch.stack([k.abs().amax(), v.abs().amax()]) for k, v in caches])
        amax = torch.maximum(amax, seen.float())
    scales = torch.where(amax > 0, amax / KV_SCALE_HEADROOM, torch.ones_like(amax))
    return [(float(k), float(v)) for k, v in scales.tolist()]


def calculate_kv_scales(runner: ModelRunner, load_tokenizer: Callable[[], Any] | None) -> None:
    """Measure the KV-cache scales (``measure_kv_scales``) and give each attention layer
    its own, replacing any a checkpoint carried. ``load_tokenizer``: None for the seeded
    token ids (a model without a tokenizer, or ``skip_tokenizer_init``).

    Raises:
        ValueError: the model's attention layers take no KV-cache scales.
    """
    layers = [module for module in runner.model.modules() if hasattr(module, "kv_scales")]
    num_layers = runner.kv_geometry()[0]
    if len(layers) != num_layers:
        raise ValueError(f"calculate_kv_scales: {type(runner.model).__name__} has "
                         f"{len(layers)} attention layers taking KV-cache scales, not "
                         f"{num_layers}.")
    # A prefill of max_model_len tokens is the longest a request may hold.
    prompts = calibration_prompts(load_tokenizer, runner.vocab_size, runner.max_model_len)
    scales = measure_kv_scales(runner, prompts)
    for layer, pair in zip(layers, scales, strict=True):
        layer.kv_scales = pair
    logger.info("calculate_kv_scales: %d layers' KV-cache scales from %d calibration prompts "
                "(%d tokens); k_scale %.3g-%.3g, v_scale %.3g-%.3g", num_layers, len(prompts),
                sum(map(len, prompts)), min(k for k, _ in scales), max(k for k, _ in scales),
                min(v for _, v in scales), max(v for _, v in scales))
