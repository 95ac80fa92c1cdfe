"""epsilon_cutoff: a built-in sampling method (its sibling eta_cutoff is added in
docs/contributing.md's walkthrough)."""

import pytest
import torch

from gridllm import SamplingParams
from worker_svc.logits_processors import verify_logits_processors
from worker_svc.sampler import Sampler, SamplingMetadata


def epsilon_params(epsilon):
    return SamplingParams(logits_processors=["epsilon_cutoff"],
                          extra_args={"epsilon_cutoff": epsilon})


def metadata(params, vocab_size):
    rows = len(params)
    return SamplingMetadata.build(params, [[0]] * rows, [[]] * rows, [None] * rows,
                                  [None] * rows, vocab_size, torch.device("cpu"))


def test_tokens_below_epsilon_are_never_sampled():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    rows = 4000
    meta = metadata([epsilon_params(0.05)] * rows, vocab_size=5)
    sampled = Sampler(seed=0)(probs.log().expand(rows, 5), meta).token_ids
    assert set(sampled.tolist()) == {0, 1, 2}


def test_most_likely_token_always_survives():
    meta = metadata([epsilon_params(0.9)], vocab_size=3)
    logits = torch.tensor([[0.0, 0.1, 0.2]])  # every probability is below 0.9
    processed = Sampler().process_logits(logits, meta)
    assert torch.isfinite(processed[0]).tolist() == [False, False, True]


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, "0.1", None])
def test_bad_epsilon_is_rejected(epsilon):
    with pytest.raises(ValueError, match=r'extra_args\["epsilon_cutoff"\]'):
        verify_logits_processors(epsilon_params(epsilon))
