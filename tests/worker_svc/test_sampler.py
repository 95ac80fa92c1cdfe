"""Sampler: statistics against the filtered softmax, seeded reproduction, logits processing
against naive loops, and raw logprobs."""

import math

import pytest
import torch

from gridllm.common.sampling_params import SamplingParams
from kernels import torch_ref
from worker_svc.sampler import Sampler, SamplingMetadata, compute_token_logprobs

CPU = torch.device("cpu")


def build(params, vocab_size, prompts=None, outputs=None, seeds=None, eos=None,
          offsets=None):
    num_rows = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(num_rows)],
        outputs if outputs is not None else [[] for _ in range(num_rows)],
        seeds if seeds is not None else [None] * num_rows,
        eos if eos is not None else [None] * num_rows,
        vocab_size, CPU, offsets=offsets)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value; bins expected below 5 are pooled into one."""
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    support = probs > 0
    small = support & (expected < 5)
    big = support & ~small
    obs = [counts[big]]
    exp = [expected[big]]
    if expected[small].sum() >= 5:
        obs.append(counts[small].sum()[None])
        exp.append(expected[small].sum()[None])
    obs_t, exp_t = torch.cat(obs), torch.cat(exp)
    stat = ((obs_t - exp_t) ** 2 / exp_t).sum()
    dof = obs_t.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def test_chi_square_pvalue_matches_tables():
    # Critical values at the 5% level from standard chi-square tables: 3.841 (1 dof),
    # 18.307 (10 dof). gammaincc(k/2, x/2) is the survival function.
    for dof, critical in ((1, 3.841), (10, 18.307)):
        p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                    torch.tensor(critical / 2, dtype=torch.float64))
        assert p.item() == pytest.approx(0.05, abs=2e-4)


VOCAB = 12
NUM_SAMPLES = 20000
P_MIN = 1e-3


def base_logits():
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(VOCAB, generator=generator)


def expected_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = (logits / params.temperature)[None]
    filtered = torch_ref.filter_logits(scaled, torch.tensor([params.top_k]),
                                       torch.tensor([params.top_p]), torch.tensor([params.min_p]))
    return torch.softmax(filtered, dim=-1)[0]


COMBOS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=2.0, top_k=-1),
    SamplingParams(temperature=1.7, top_k=4),
    SamplingParams(top_p=0.75),
    SamplingParams(min_p=0.15),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
]


def check_frequencies(samples: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(samples, minlength=VOCAB)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    assert chi_square_pvalue(counts, probs) > P_MIN


@pytest.mark.parametrize("params", COMBOS, ids=[f"combo{i}" for i in range(len(COMBOS))])
def test_frequencies_match_filtered_softmax(params):
    logits = base_logits()
    meta = build([params] * NUM_SAMPLES, VOCAB)
    samples = Sampler(seed=0)(logits.expand(NUM_SAMPLES, VOCAB), meta).token_ids
    check_frequencies(samples, expected_probs(logits, params))


def test_mixed_batch_samples_each_row_from_its_own_params():
    logits = base_logits()
    greedy = SamplingParams(temperature=0.0)
    combos = [*COMBOS, greedy]
    rows_per_combo = 8000
    params = [combos[i % len(combos)] for i in range(rows_per_combo * len(combos))]
    meta = build(params, VOCAB)
    samples = Sampler(seed=1)(logits.expand(len(params), VOCAB), meta).token_ids
    groups = samples.view(rows_per_combo, len(combos))
    for column, combo in enumerate(COMBOS):
        check_frequencies(groups[:, column], expected_probs(logits, combo))
    assert (groups[:, -1] == logits.argmax()).all()


def test_frequency_check_has_power():
    # Samples at temperature 0.6 must be told apart from the temperature-1 distribution.
    logits = base_logits()
    meta = build([SamplingParams(temperature=0.6)] * NUM_SAMPLES, VOCAB)
    samples = Sampler(seed=0)(logits.expand(NUM_SAMPLES, VOCAB), meta).token_ids
    counts = torch.bincount(samples, minlength=VOCAB)
    assert chi_square_pvalue(counts, torch.softmax(logits, -1)) < 1e-6


def test_filters_keep_exactly_the_expected_tokens():
    # Hand-computed: probs 0.4 0.3 0.2 0.1; top_p=0.6 keeps {0, 1}; top_k=3 keeps {0, 1, 2};
    # min_p=0.3 drops tokens below 0.12, keeping {0, 1, 2}.
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))  # token ids shuffled on purpose
    cases = [(SamplingParams(top_p=0.6), {1, 3}), (SamplingParams(top_k=3), {1, 2, 3}),
             (SamplingParams(min_p=0.3), {1, 2, 3}), (SamplingParams(top_k=1), {1})]
    params = [p for p, _ in cases for _ in range(2000)]
    samples = Sampler(seed=0)(logits.expand(len(params), 4), build(params, 4)).token_ids
    for i, (_, kept) in enumerate(cases):
        assert set(samples[i * 2000:(i + 1) * 2000].tolist()) == kept


def run_steps(batch_params, seeded_row, seed, num_steps, vocab_size, sampler_seed):
    """Sample num_steps steps; the seeded row is keyed by ``seed`` and its step number."""
    logits_gen = torch.Generator().manual_seed(99)
    sampled = []
    for step in range(num_steps):
        seeds = [seed if i == seeded_row else p.seed for i, p in enumerate(batch_params)]
        logits = torch.randn(vocab_size, generator=logits_gen)
        meta = build(batch_params, vocab_size, seeds=seeds,
                     offsets=[step] * len(batch_params))
        out = Sampler(seed=sampler_seed)(logits.expand(len(batch_params), vocab_size), meta)
        sampled.append(out.token_ids[seeded_row].item())
    return sampled


def test_seeded_rows_reproduce_across_batch_compositions():
    seeded = SamplingParams(temperature=0.9, top_k=50, seed=1234)
    vocab_size, steps = 1000, 8
    alone = run_steps([seeded], 0, 1234, steps, vocab_size, sampler_seed=0)
    crowded = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5),
               seeded, SamplingParams(seed=7), SamplingParams(min_p=0.1)]
    in_batch = run_steps(crowded, 3, 1234, steps, vocab_size, sampler_seed=5)
    all_seeded = run_steps([SamplingParams(seed=7), seeded], 1, 1234, steps, vocab_size,
                           sampler_seed=None)
    assert alone == in_batch == all_seeded
    other_seed = run_steps([seeded], 0, 4321, steps, vocab_size, sampler_seed=0)
    assert other_seed != alone


def test_sampler_seed_reproduces_unseeded_rows():
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(3))
    meta = build([SamplingParams()] * 64, 500)
    first = Sampler(seed=11)(logits, meta).token_ids
    assert torch.equal(first, Sampler(seed=11)(logits, meta).token_ids)
    assert not torch.equal(first, Sampler(seed=12)(logits, meta).token_ids)


def naive_process(logits, params, prompt, output, eos):
    """Per-token loops: allowed ids, min_tokens, logit_bias, then vLLM's penalties."""
    out = logits.clone().tolist()
    vocab_size = len(out)
    if params.allowed_token_ids is not None:
        out = [x if t in params.allowed_token_ids else -math.inf for t, x in enumerate(out)]
    if len(output) < params.min_tokens:
        for t in params.stop_token_ids + ([] if params.ignore_eos else [eos]):
            out[t] = -math.inf
    for t, bias in (params.logit_bias or {}).items():
        out[t] += bias
    for t in range(vocab_size):
        if t in prompt or t in output:
            rep = params.repetition_penalty
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        count = output.count(t)
        out[t] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return torch.tensor(out)


def test_process_logits_matches_naive_loops():
    vocab_size = 20
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, temperature=0.0),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias={2: 3.0}),
        SamplingParams(logit_bias={0: -2.0, 5: 4.5}, repetition_penalty=1.3),
        SamplingParams(allowed_token_ids=[1, 4, 7, 9], presence_penalty=1.0),
        SamplingParams(min_tokens=3, stop_token_ids=[6, 8]),
        SamplingParams(min_tokens=3, stop_token_ids=[6], ignore_eos=True),
        SamplingParams(min_tokens=2, stop_token_ids=[6]),  # already has 2 outputs: no mask
        SamplingParams(),
    ]
    prompts = [[1, 2, 3, 3], [4, 5], [2, 9], [5, 0, 0], [1], [2], [2], [2], [3]]
    outputs = [[3, 7], [4, 4, 4, 11], [9, 9, 12], [], [7, 7, 9], [1], [1], [1, 1], [5]]
    eos = [19, 19, 19, 19, 19, 19, 19, 19, None]
    logits = torch.randn(len(params), vocab_size, generator=torch.Generator().manual_seed(0)) * 2
    original = logits.clone()
    meta = build(params, vocab_size, prompts, outputs, eos=eos)
    processed = Sampler().process_logits(logits, meta)
    for row, p in enumerate(params):
        expected = naive_process(logits[row], p, prompts[row], outputs[row], eos[row])
        torch.testing.assert_close(processed[row], expected)
    assert torch.equal(logits, original), "the caller's logits were modified"


def test_greedy_is_argmax_of_processed_logits():
    vocab_size = 50
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.5, seed=3),
              SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0.0, allowed_token_ids=[3, 4])]
    prompts = [[int(t) for t in range(0, 50, 2)], [1], [1], [1]]
    logits = torch.randn(len(params), vocab_size, generator=torch.Generator().manual_seed(1))
    meta = build(params, vocab_size, prompts, seeds=[None, 3, None, None])
    sampler = Sampler(seed=0)
    token_ids = sampler(logits, meta).token_ids
    processed = sampler.process_logits(logits, meta)
    greedy_rows = [0, 2, 3]
    assert torch.equal(token_ids[greedy_rows], processed[greedy_rows].argmax(-1))
    assert token_ids[2] == 7 and token_ids[3] in (3, 4)


def test_all_greedy_fast_path_skips_processing():
    logits = torch.randn(8, 30)
    meta = build([SamplingParams(temperature=0.0)] * 8, 30)
    assert not meta.needs_logits_processing and meta.all_greedy
    sampler = Sampler()
    assert sampler.process_logits(logits, meta) is logits
    assert torch.equal(sampler(logits, meta).token_ids, logits.argmax(-1))


def test_all_greedy_kernel_path_is_torch_argmax():
    """The argmax kernel (here in Triton's interpreter) where the sampler uses kernels."""
    logits = torch.randn(4, 700, generator=torch.Generator().manual_seed(2))
    logits[1, 600] = logits[1, 650] = 100.0  # a tie: the first index
    meta = build([SamplingParams(temperature=0.0)] * 4, 700)
    token_ids = Sampler(use_kernel=True)(logits, meta).token_ids
    assert torch.equal(token_ids, logits.argmax(-1)) and int(token_ids[1]) == 600


SIXTEEN_BIT_CASES = {
    "greedy": [SamplingParams(temperature=0.0)] * 3,
    "greedy, masked": [SamplingParams(temperature=0.0, allowed_token_ids=[3, 4, 9]),
                       SamplingParams(temperature=0.0, logit_bias={7: 0.01})],
    "greedy, penalties": [SamplingParams(temperature=0.0, repetition_penalty=1.3),
                          SamplingParams(temperature=0.0, frequency_penalty=0.2)],
    "greedy, logprobs": [SamplingParams(temperature=0.0, logprobs=4), SamplingParams(
        temperature=0.0)],
    "random": [SamplingParams(temperature=0.7, top_p=0.9, seed=5),
               SamplingParams(temperature=0.0)],
    "random, penalties": [SamplingParams(temperature=1.3, top_k=50, seed=6,
                                         repetition_penalty=1.2, presence_penalty=0.5),
                          SamplingParams(temperature=0.0, frequency_penalty=0.3)],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("case", list(SIXTEEN_BIT_CASES))
def test_sixteen_bit_logits_sample_as_their_float32_copy(case, use_kernel, dtype):
    """The runner hands the sampler the LM head's 16-bit logits: every path (the kernels
    and the argmax that read them as they are, here in Triton's interpreter, and those that
    convert them) gives the tokens and logprobs of the float32 copy, ties of the coarse
    dtype included."""
    params = SIXTEEN_BIT_CASES[case]
    vocab_size = 600
    logits = (torch.randn(len(params), vocab_size, generator=torch.Generator().manual_seed(3))
              * 3).to(dtype)
    logits[:, 100] = logits[:, 200] = logits.max() + 1  # a tie: the first index wins
    original = logits.clone()
    meta = build(params, vocab_size, prompts=[[100, 5]] * len(params),
                 outputs=[[200]] * len(params), seeds=[p.seed for p in params])
    out = Sampler(seed=0, use_kernel=use_kernel)(logits, meta)
    ref = Sampler(seed=0, use_kernel=use_kernel)(logits.float(), meta)
    assert torch.equal(out.token_ids, ref.token_ids)
    assert out.logprobs == ref.logprobs
    assert torch.equal(logits, original), "the caller's logits were modified"
    if case == "greedy":
        assert out.token_ids.tolist() == [100] * len(params)


def test_allowed_token_ids_and_min_tokens_hold_when_sampling():
    vocab_size, rows = 30, 3000
    eos = 0
    logits = torch.zeros(vocab_size)
    logits[eos] = 5.0  # EOS would win most draws if it were not masked
    params = [SamplingParams(allowed_token_ids=[0, 3, 5]),
              SamplingParams(min_tokens=4, stop_token_ids=[1, 2])]
    batch = [params[i % 2] for i in range(rows)]
    meta = build(batch, vocab_size, outputs=[[9]] * rows, eos=[eos] * rows)
    samples = Sampler(seed=0)(logits.expand(rows, vocab_size), meta).token_ids.view(-1, 2)
    assert set(samples[:, 0].tolist()) == {0, 3, 5}
    assert not {0, 1, 2} & set(samples[:, 1].tolist())


def test_unknown_logits_processor_is_rejected():
    with pytest.raises(ValueError, match="^logits_processors "):
        build([SamplingParams(logits_processors=["no_such_processor"])], 10)


def assert_logprobs_of_raw_logits(entry, raw_logits_row, sampled, num):
    logprobs = torch.log_softmax(raw_logits_row.double(), -1)
    assert len(entry.token_ids) == len(entry.logprobs) == len(entry.ranks) == num + 1
    assert entry.token_ids[0] == sampled
    top = logprobs.topk(num).values
    torch.testing.assert_close(torch.tensor(entry.logprobs[1:], dtype=torch.float64), top)
    for token, value, rank in zip(entry.token_ids, entry.logprobs, entry.ranks, strict=True):
        assert value == pytest.approx(logprobs[token].item(), abs=1e-5)
        assert rank == 1 + int((logprobs > logprobs[token]).sum())


def test_logprobs_are_raw_with_sampled_token_first():
    vocab_size = 40
    params = [SamplingParams(logprobs=3, temperature=0.3, repetition_penalty=1.8),
              SamplingParams(),
              SamplingParams(logprobs=0, logit_bias={5: 50.0}),
              SamplingParams(logprobs=5, temperature=0.0, top_k=2)]
    logits = torch.randn(len(params), vocab_size, generator=torch.Generator().manual_seed(2))
    meta = build(params, vocab_size, prompts=[list(range(20))] * 4)
    out = Sampler(seed=0)(logits, meta)
    assert out.logprobs is not None and out.logprobs[1] is None
    for row, num in ((0, 3), (2, 0), (3, 5)):
        assert_logprobs_of_raw_logits(out.logprobs[row], logits[row],
                                      out.token_ids[row].item(), num)
    assert out.token_ids[2] == 5  # the bias moved the sample, not the reported logprobs


def test_no_logprobs_requested_gives_none():
    meta = build([SamplingParams()] * 2, 10)
    assert Sampler()(torch.randn(2, 10), meta).logprobs is None


def test_compute_token_logprobs_ranks_with_ties():
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 3.0]])
    entries = compute_token_logprobs(logits, torch.tensor([4, 1]), num_top=3)
    assert entries[0].ranks[0] == 3 and sorted(entries[0].token_ids[1:3]) == [0, 2]
    assert entries[0].ranks[1:] == [1, 1, 3]
    assert entries[1].token_ids[:2] == [1, 4] and entries[1].ranks[:2] == [2, 1]
    for row, entry in enumerate(entries):
        assert_logprobs_of_raw_logits(entry, logits[row], entry.token_ids[0], 3)
    only_token = compute_token_logprobs(logits, torch.tensor([3, 4]), num_top=0)
    assert [e.token_ids for e in only_token] == [[3], [4]]
    assert [e.ranks for e in only_token] == [[5], [1]]


def test_kernel_path_matches_torch_semantics_and_keys_draws_by_seed():
    """The fused kernel through the Sampler (Triton's interpreter here): greedy rows are the
    argmax of the processed logits, masks apply, and a seeded row's draw depends only on
    (seed, offset)."""
    vocab_size = 40
    gen = torch.Generator().manual_seed(5)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7, frequency_penalty=0.3),
              SamplingParams(temperature=0.8, top_k=5, seed=11),
              SamplingParams(temperature=0.0, allowed_token_ids=[3, 4], presence_penalty=1.0),
              SamplingParams(temperature=1.3, top_p=0.7, seed=12, logit_bias={9: 3.0})]
    prompts = [[1, 2, 3], [4], [3, 5], [9, 9]]
    outputs = [[2, 2, 7], [1], [], [8]]
    logits = torch.randn(len(params), vocab_size, generator=gen) * 2
    meta = build(params, vocab_size, prompts, outputs, seeds=[None, 11, None, 12])
    kernel = Sampler(seed=0, use_kernel=True)
    token_ids = kernel(logits, meta).token_ids
    processed = kernel.process_logits(logits, meta)
    assert token_ids[[0, 2]].tolist() == processed[[0, 2]].argmax(-1).tolist()
    assert token_ids[2] in (3, 4)
    kept = torch_ref.filter_logits(processed[[1, 3]] / torch.tensor([0.8, 1.3])[:, None],
                                   torch.tensor([5, 0]), torch.tensor([1.0, 0.7]),
                                   torch.tensor([0.0, 0.0])) > float("-inf")
    assert kept[0, token_ids[1]] and kept[1, token_ids[3]]
    # Row 3 again, alone and in another position: the same draw; another offset: a new one.
    again = kernel(logits[[3, 3]], build([SamplingParams(), params[3]], vocab_size,
                                         [[0], prompts[3]], [[], outputs[3]], seeds=[5, 12]))
    assert again.token_ids[1] == token_ids[3]
    draws = {int(kernel(logits[[3]], build([params[3]], vocab_size, [prompts[3]], [outputs[3]],
                                            seeds=[12], offsets=[k])).token_ids[0])
             for k in range(12)}
    assert len(draws) > 1
