"""Logits-processor registry and the built-in processors against transformers' own
(docs/contributing.md's walkthrough is followed by tests/test_contributing.py)."""

import pytest
import torch
from transformers import EpsilonLogitsWarper, NoRepeatNGramLogitsProcessor

from gridllm.common.sampling_params import SamplingParams
from worker_svc import logits_processors
from worker_svc.logits_processors import (
    register_logits_processor,
    registered_logits_processors,
    verify_logits_processors,
)
from worker_svc.sampler import Sampler, SamplingMetadata

CPU = torch.device("cpu")


def build(params, prompts, outputs, vocab_size):
    return SamplingMetadata.build(params, prompts, outputs, [None] * len(params),
                                  [None] * len(params), vocab_size, CPU)


def test_builtins_are_registered_and_duplicates_rejected():
    assert {"no_repeat_ngram", "epsilon_cutoff"} <= set(registered_logits_processors())
    with pytest.raises(ValueError, match="already registered"):
        register_logits_processor("epsilon_cutoff")(lambda logits, batch: logits)


@pytest.mark.parametrize(("extra_args", "match"), [
    (None, r'extra_args\["no_repeat_ngram_size"\]'),
    ({"no_repeat_ngram_size": 0}, r'extra_args\["no_repeat_ngram_size"\]'),
    ({"no_repeat_ngram_size": 2.5}, r'extra_args\["no_repeat_ngram_size"\]'),
])
def test_no_repeat_ngram_verify(extra_args, match):
    with pytest.raises(ValueError, match=match):
        verify_logits_processors(SamplingParams(logits_processors=["no_repeat_ngram"],
                                                extra_args=extra_args))


def test_unknown_name_fails_verification():
    with pytest.raises(ValueError, match="^logits_processors "):
        verify_logits_processors(SamplingParams(logits_processors=["nope"]))


def test_no_repeat_ngram_matches_transformers():
    vocab_size = 8
    gen = torch.Generator().manual_seed(0)
    # Equal total lengths so transformers sees one [B, L] tensor; few distinct tokens so
    # n-grams repeat.
    sequences = torch.randint(0, 4, (6, 14), generator=gen).tolist()
    sizes = [1, 2, 3, 2, 4, 20]
    params = [SamplingParams(logits_processors=["no_repeat_ngram"],
                             extra_args={"no_repeat_ngram_size": n}) for n in sizes]
    prompts = [seq[:5 + i] for i, seq in enumerate(sequences)]
    outputs = [seq[5 + i:] for i, seq in enumerate(sequences)]
    logits = torch.randn(len(params), vocab_size, generator=gen)
    processed = Sampler().process_logits(logits, build(params, prompts, outputs, vocab_size))
    input_ids = torch.tensor(sequences)
    for row, n in enumerate(sizes):
        expected = NoRepeatNGramLogitsProcessor(n)(input_ids[row:row + 1], logits[row:row + 1])
        assert torch.equal(processed[row], expected[0]), f"row {row}, n={n}"
    assert torch.isinf(processed[1]).any(), "the test data must exercise a ban"


def test_epsilon_cutoff_matches_transformers():
    vocab_size = 50
    gen = torch.Generator().manual_seed(1)
    epsilons = [1e-3, 0.02, 0.05, 0.9]
    params = [SamplingParams(logits_processors=["epsilon_cutoff"],
                             extra_args={"epsilon_cutoff": e}) for e in epsilons]
    logits = torch.randn(len(params), vocab_size, generator=gen) * 2
    processed = Sampler().process_logits(logits, build(params, [[0]] * 4, [[]] * 4, vocab_size))
    for row, epsilon in enumerate(epsilons):
        expected = EpsilonLogitsWarper(epsilon)(None, logits[row:row + 1])
        assert torch.equal(processed[row], expected[0]), f"epsilon={epsilon}"


def test_processors_touch_only_rows_that_enable_them():
    vocab_size = 30
    params = [SamplingParams(),
              SamplingParams(logits_processors=["epsilon_cutoff"],
                             extra_args={"epsilon_cutoff": 0.05}),
              SamplingParams(extra_args={"epsilon_cutoff": 0.05}),  # args alone do not enable
              SamplingParams(logits_processors=["epsilon_cutoff", "no_repeat_ngram"],
                             extra_args={"epsilon_cutoff": 0.05, "no_repeat_ngram_size": 1})]
    logits = torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(2)) * 3
    meta = build(params, [[1, 2]] * 4, [[3]] * 4, vocab_size)
    processed = Sampler().process_logits(logits, meta)
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert torch.isinf(processed[1]).any()
    # Row 3 runs both, in registration order: no_repeat_ngram (n = 1 bans every seen token),
    # then epsilon_cutoff on what is left.
    banned = logits[3].clone()
    banned[[1, 2, 3]] = float("-inf")
    expected = EpsilonLogitsWarper(0.05)(None, banned[None])[0]
    assert torch.equal(processed[3], expected)


def test_epsilon_cutoff_is_the_module_function():
    # The registered processor is the module's function.
    spec = logits_processors.get_logits_processor("epsilon_cutoff")
    assert spec.fn is logits_processors.epsilon_cutoff
