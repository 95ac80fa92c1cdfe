import pytest
import torch
import triton
import triton.language as tl

from kernels import torch_ref
from kernels.sampling import sample
from tests.kernels.conftest import DEVICE, assert_close, needs_gpu

NEG_INF = float("-inf")


@pytest.fixture(params=["whole", "by-live"])
def chunk_reads(request, monkeypatch):
    """Every chunk loaded whole (a grid of few programs an SM), or the chunks mostly below
    the interval reading their live sub-blocks in turn (the other paths of the passes and
    the draw)."""
    import kernels.sampling

    monkeypatch.setattr(kernels.sampling, "_WHOLE_PROGRAMS_PER_SM",
                        10**9 if request.param == "whole" else 0)


def _params(num_rows: int, device: torch.device, temperature=1.0, top_k=0, top_p=1.0,
            min_p=0.0):
    def full(v, dtype):
        t = torch.as_tensor(v, dtype=dtype)
        return (t.expand(num_rows) if t.dim() == 0 else t).contiguous().to(device)

    return dict(temperature=full(temperature, torch.float32),
                top_k=full(top_k, torch.int32), top_p=full(top_p, torch.float32),
                min_p=full(min_p, torch.float32))


def _penalties(num_rows: int, vocab: int, device: torch.device):
    return dict(
        prompt_mask=(torch.rand(num_rows, vocab) < 0.2).to(device),
        output_counts=(torch.randint(0, 3, (num_rows, vocab))
                       * (torch.rand(num_rows, vocab) < 0.2)).to(torch.int32).to(device),
        presence_penalty=(torch.rand(num_rows) - 0.5).to(device),
        frequency_penalty=(torch.rand(num_rows) - 0.5).to(device),
        repetition_penalty=(0.5 + torch.rand(num_rows) * 1.5).to(device))


def _processed(logits, bias, pen, temperature):
    x = torch_ref.apply_penalties(logits.float() + bias, pen["prompt_mask"],
                                  pen["output_counts"], pen["presence_penalty"],
                                  pen["frequency_penalty"], pen["repetition_penalty"])
    return x, x / torch.where(temperature < 1e-5, 1.0, temperature)[:, None]


def _check_processing_and_greedy(num_rows, vocab, device):
    logits = 3 * torch.randn(num_rows, vocab, device=device)
    bias = torch.zeros(num_rows, vocab, device=device)
    bias[:, :5] = 4.0
    bias[0, int(logits[0].argmax())] = NEG_INF  # a forbidden token
    pen = _penalties(num_rows, vocab, device)
    temperature = torch.rand(num_rows, device=device) + 0.2
    temperature[::2] = 0.0  # greedy rows
    params = _params(num_rows, device, temperature=temperature)
    workspace = torch.full((num_rows, vocab), float("nan"), device=device)
    seeds = torch.arange(num_rows, device=device)
    tokens = sample(logits, seeds=seeds, offsets=torch.zeros_like(seeds), logit_bias=bias,
                    workspace=workspace, **params, **pen)
    penalised, scaled = _processed(logits, bias, pen, params["temperature"])
    assert_close(workspace, scaled, "processed logits", torch.float32, equal_nan=False)
    greedy = params["temperature"] < 1e-5
    assert torch.equal(tokens[greedy], penalised[greedy].argmax(dim=-1))
    assert bool((tokens[0] != logits[0].argmax()).item())


def test_penalties_bias_temperature_and_greedy(chunk_reads):
    _check_processing_and_greedy(6, 300, DEVICE)


def test_filtered_out_tokens_are_never_sampled():
    # Each filter alone and combined; 5 differently seeded copies of every config.
    torch.manual_seed(0)  # the logits do not depend on which tests ran before
    configs = [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2),
               (10, 0.8, 0.05), (1, 1.0, 0.0), (50, 0.95, 0.0), (0, 0.0, 0.0)]
    copies = 5
    vocab = 300
    num_rows = len(configs) * copies
    rows = [c for c in configs for _ in range(copies)]
    top_k, top_p, min_p = ([r[i] for r in rows] for i in range(3))
    logits = 2 * torch.randn(len(configs), vocab).repeat_interleave(copies, 0).to(DEVICE)
    logits[:, 7] = logits[:, 8]  # a tie, so top-k must keep ties
    params = _params(num_rows, DEVICE, 0.9, top_k, top_p, min_p)
    seeds = torch.arange(num_rows, device=DEVICE) * 7919
    tokens = sample(logits, seeds=seeds, offsets=torch.zeros_like(seeds), **params)
    scaled = logits / 0.9
    kept = torch_ref.filter_logits(scaled, params["top_k"], params["top_p"],
                                   params["min_p"]) > NEG_INF
    # Where the top-p cut falls between equal logits (the tie at 7 / 8 can be a row's
    # largest), which of them the prefix keeps is a tie-break: either is kept.
    lowest_kept = torch.where(kept, scaled, float("inf")).min(dim=-1, keepdim=True).values
    kept |= scaled == lowest_kept
    picked = tokens.long().to(kept.device)[:, None]
    ok = kept.gather(-1, picked)[:, 0]
    assert bool(ok.all()), f"sampled filtered-out tokens in rows {(~ok).nonzero().tolist()}"
    # top_k=1 and top_p=0 leave only the largest logit (or a token tied with it).
    for c in (5, 7):
        rows = slice(c * copies, (c + 1) * copies)
        chosen = logits[rows].gather(-1, picked[rows])[:, 0]
        assert torch.equal(chosen, logits[rows].max(dim=-1).values)


def test_same_seed_and_offset_reproduce_across_batches():
    vocab = 200
    row = torch.randn(1, vocab, device=DEVICE)
    logits = torch.cat([row, torch.randn(2, vocab, device=DEVICE), row])
    params = _params(4, DEVICE, 1.0, 20, 0.9)
    seeds = torch.tensor([11, 12, 13, 11], device=DEVICE)
    tokens = sample(logits, seeds=seeds, offsets=torch.tensor([4, 4, 4, 4], device=DEVICE),
                    **params)
    assert tokens[0] == tokens[3]
    alone = sample(row, seeds=seeds[:1], offsets=torch.tensor([4], device=DEVICE),
                   **_params(1, DEVICE, 1.0, 20, 0.9))
    assert alone[0] == tokens[0]


@triton.jit
def _uniforms_kernel(seed_ptr, offset_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    hi = tl.load(offset_ptr + row).to(tl.int64) << 32
    v = tl.arange(0, N)
    tl.store(out_ptr + row * N + v, tl.rand(seed, hi + v.to(tl.int64)))


def test_torch_philox_is_triton_rand_bit_for_bit():
    # The CPU sampler keys its draws with the kernel's Philox stream.
    seeds = torch.tensor([0, 1, 12345, 2**62 + 7, 2**40 + 3], device=DEVICE)
    offsets = torch.tensor([0, 5, 2**31 + 1, 3, 1000], device=DEVICE)
    out = torch.empty(5, 64, device=DEVICE)
    _uniforms_kernel[(5,)](seeds, offsets, out, N=64)
    expected = torch_ref.philox_uniform(seeds[:, None].cpu(), offsets[:, None].cpu(),
                                        torch.arange(64)[None])
    assert torch.equal(out.cpu(), expected)
    assert 0.0 <= float(expected.min()) and float(expected.max()) < 1.0


def test_torch_reference_draw_is_keyed_by_seed_and_offset():
    vocab = 50
    row = 2 * torch.randn(1, vocab)
    logits = torch.cat([row, torch.randn(2, vocab), row])
    params = _params(4, torch.device("cpu"), 1.0, 20, 0.9)
    seeds = torch.tensor([11, 12, 13, 11])
    tokens = torch_ref.sample(logits, seeds=seeds, offsets=torch.full((4,), 4), **params)
    alone = torch_ref.sample(row, seeds=seeds[:1], offsets=torch.tensor([4]),
                             **_params(1, torch.device("cpu"), 1.0, 20, 0.9))
    assert tokens[0] == tokens[3] == alone[0]
    draws = {int(torch_ref.sample(row, seeds=seeds[:1], offsets=torch.tensor([k]),
                                  **_params(1, torch.device("cpu"), 1.0, 20, 0.9))[0])
             for k in range(20)}
    assert len(draws) > 1


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    # Pool the rare outcomes so every bin expects >= 5 draws (chi-square's validity).
    rare = probs * n < 5
    if bool(rare.any()):
        counts = torch.cat([counts[~rare], counts[rare].sum().view(1)])
        probs = torch.cat([probs[~rare], probs[rare].sum().view(1)])
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(counts.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def _check_distribution(num_draws: int, vocab: int, temperature: float, top_k: int,
                        top_p: float, min_p: float, device: torch.device):
    gen = torch.Generator().manual_seed(1234)
    row = (2 * torch.randn(1, vocab, generator=gen)).to(device)
    logits = row.expand(num_draws, vocab).contiguous()
    params = _params(num_draws, device, temperature, top_k, top_p, min_p)
    seeds = torch.arange(num_draws, device=device) + 99
    tokens = sample(logits, seeds=seeds, offsets=torch.full_like(seeds, 3), **params)
    filtered = torch_ref.filter_logits(row / temperature, params["top_k"][:1],
                                       params["top_p"][:1], params["min_p"][:1])
    probs = torch.softmax(filtered, dim=-1)[0].double().cpu()
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a filtered-out token"
    p_value = _chi_square_p_value(counts[support], probs[support])
    assert p_value > 1e-3, f"chi-square p={p_value:g}: counts {counts[support].tolist()} " \
                           f"vs probs {probs[support].tolist()}"


def test_sampling_matches_filtered_softmax(chunk_reads):
    _check_distribution(200, 48, 0.8, 12, 0.9, 0.01, DEVICE)


@pytest.mark.gpu
@needs_gpu
def test_sampling_gpu_large_vocab():
    _check_processing_and_greedy(64, 128256, torch.device("cuda"))
    _check_distribution(100000, 512, 1.1, 100, 0.95, 0.0, torch.device("cuda"))
    _check_distribution(4000, 128256, 0.7, 40, 0.9, 0.02, torch.device("cuda"))
    # Top-k off: the top-k search converges at once, top-p searches the whole vocabulary.
    _check_distribution(100000, 512, 1.1, 0, 0.95, 0.0, torch.device("cuda"))
    _check_distribution(4000, 128256, 1.0, 0, 0.95, 0.0, torch.device("cuda"))


def _check_sixteen_bit_logits(num_rows, vocab, device):
    """16-bit logits (as the LM head writes them) draw the tokens of their float32 copy,
    with and without penalties: each load converts to float32 before any arithmetic."""
    torch.manual_seed(7)
    params = _params(num_rows, device, temperature=torch.rand(num_rows) + 0.3, top_k=50,
                     top_p=0.9, min_p=0.01)
    params["temperature"][::3] = 0.0  # greedy rows among them
    seeds = torch.arange(num_rows, device=device) * 7919
    offsets = torch.arange(num_rows, device=device)
    pen = _penalties(num_rows, vocab, device)
    for dtype in (torch.bfloat16, torch.float16):
        logits = (3 * torch.randn(num_rows, vocab, device=device)).to(dtype)
        for extra in ({}, pen):
            got = sample(logits, seeds=seeds, offsets=offsets, **params, **extra)
            expected = sample(logits.float(), seeds=seeds, offsets=offsets, **params,
                              **extra)
            assert torch.equal(got, expected), (dtype, bool(extra))


def test_sixteen_bit_logits_draw_as_their_float32_copy():
    _check_sixteen_bit_logits(4, 520, DEVICE)


@pytest.mark.gpu
@needs_gpu
def test_sixteen_bit_logits_draw_as_their_float32_copy_gpu():
    _check_sixteen_bit_logits(64, 151936, torch.device("cuda"))


def _check_logits_read_in_place(num_rows, vocab, device, dtypes):
    """Without a bias or penalties every pass re-reads the logits instead of a float32
    workspace: the same processed values, so the tokens drawn through a workspace."""
    torch.manual_seed(3)
    configs = [(0, 1.0, 0.0), (0, 0.9, 0.0), (20, 1.0, 0.0), (20, 0.8, 0.05),
               (0, 0.95, 0.02), (0, 1.0, 0.0)]
    rows = [configs[i % len(configs)] for i in range(num_rows)]
    top_k, top_p, min_p = ([r[i] for r in rows] for i in range(3))
    temperature = torch.rand(num_rows) + 0.3
    temperature[len(configs) - 1::len(configs)] = 0.0  # greedy rows
    params = _params(num_rows, device, temperature, top_k, top_p, min_p)
    seeds = torch.arange(num_rows, device=device) * 7919
    offsets = torch.arange(num_rows, device=device)
    for dtype in dtypes:
        logits = (2 * torch.randn(num_rows, vocab, device=device)).to(dtype)
        direct = sample(logits, seeds=seeds, offsets=offsets, **params)
        workspace = torch.full((num_rows, vocab), float("nan"), device=device)
        through = sample(logits, seeds=seeds, offsets=offsets, workspace=workspace,
                         **params)
        assert torch.equal(direct, through), dtype


def test_logits_read_in_place_draw_as_through_a_workspace(chunk_reads):
    _check_logits_read_in_place(6, 520, DEVICE, (torch.bfloat16,))


@pytest.mark.gpu
@needs_gpu
def test_logits_read_in_place_draw_as_through_a_workspace_gpu():
    _check_logits_read_in_place(64, 151936, torch.device("cuda"),
                                (torch.float32, torch.bfloat16))


def _check_searches_launched_for_the_batch(num_rows, vocab, device, monkeypatch,
                                           dtype=torch.float32):
    """A batch whose rows need no top-k (no top-p) search launches that search's first
    pass only and draws the tokens of the full launch sequence; a top-k search still
    closes in the first top-p pass (here, the largest logit beside the next value of
    ``dtype`` below it, under top-k 1: the search's last interval holds both). 16-bit
    logits read in place search their 16-bit keys: 4 passes a search, not 8."""
    import kernels.sampling as sampling

    launched = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["TOP_P_PHASE"], kwargs["STAGE"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sampling, "_radix_pass_kernel",
                        Recording(sampling._radix_pass_kernel))
    torch.manual_seed(5)
    seeds = torch.arange(num_rows, device=device) * 7919
    offsets = torch.arange(num_rows, device=device)
    temperature = torch.rand(num_rows) + 0.5
    temperature[3::4] = 0.0  # greedy rows
    batches = {  # flags: (top_k, top_p, min_p) of the rows
        (True, False): [(0, 0.9, 0.0), (0, 0.6, 0.05), (0, 1.0, 0.02), (0, 1.0, 0.0)],
        (False, True): [(20, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.05), (0, 1.0, 0.0)],
        (True, True): [(0, 1.0, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.0), (0, 1.0, 0.01)],
    }
    pen = _penalties(num_rows, vocab, device)
    for (no_top_k, no_top_p), configs in batches.items():
        rows = [configs[i % len(configs)] for i in range(num_rows)]
        top_k, top_p, min_p = ([r[i] for r in rows] for i in range(3))
        params = _params(num_rows, device, temperature, top_k, top_p, min_p)
        logits = (2 * torch.randn(num_rows, vocab, device=device)).to(dtype)
        row_max = logits.max(dim=-1).values
        below = _next_below(row_max)
        top = logits.argmax(dim=-1)
        near = (top + 1) % vocab
        # A max of its own (16-bit logits often tie at it: top-k 1 keeps every tie) with
        # the next value below it beside it.
        logits = torch.minimum(logits, below[:, None])
        logits[torch.arange(num_rows), top] = row_max
        logits[torch.arange(num_rows), near] = below
        for extra in ({}, pen):
            full_passes = 4 if dtype != torch.float32 and not extra else 8
            passes = {False: full_passes, True: 1}
            launched.clear()
            full = sample(logits, seeds=seeds, offsets=offsets, **params, **extra)
            assert len(launched) == 2 * full_passes
            launched.clear()
            got = sample(logits, seeds=seeds, offsets=offsets, no_top_k=no_top_k,
                         no_top_p=no_top_p, **params, **extra)
            # Stages: a top-k search's passes 0, 1, 1, ..., a top-p search's 0, 1, 2, 2, ...
            assert launched == ([(False, min(i, 1)) for i in range(passes[no_top_k])]
                                + [(True, min(i, 2)) for i in range(passes[no_top_p])])
            assert torch.equal(got, full), (no_top_k, no_top_p, bool(extra))
            top_1 = (torch.tensor([k == 1 for k in top_k]) & (temperature > 0)).to(device)
            if not extra and bool(top_1.any()):
                assert torch.equal(got[top_1], top[top_1])


def test_batches_without_a_search_launch_its_first_pass_only(chunk_reads, monkeypatch):
    _check_searches_launched_for_the_batch(16, 300, DEVICE, monkeypatch)


def test_sixteen_bit_searches_launch_half_the_passes(monkeypatch):
    _check_searches_launched_for_the_batch(16, 300, DEVICE, monkeypatch, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
def test_batches_without_a_search_launch_its_first_pass_only_gpu(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        _check_searches_launched_for_the_batch(64, 151936, torch.device("cuda"),
                                               monkeypatch, dtype)


def _check_top_p_from_its_lower_bound(num_rows, per_group, device):
    """Top-p whose first pass puts its pivots from a lower bound of the threshold up keeps
    the reference's values: the max at 0, a group at -1 and a group at -2 (mass
    1, 7.4 and 13.5 at ``per_group`` 20 / 100), the rest at -30 (below the bound); top-p
    0.3 keeps the max and the -1 group (drawn nearly always), 0.5 the -2 group too; with
    a top-k below the bound (the rest's ties) and above it (the max and the -1 group).
    Over 16-bit logits read in place and over float32 (32-bit keys), against the
    reference's lowest kept value (a value threshold keeps all its ties, where the
    reference's sorted prefix may stop among them)."""
    gen = torch.Generator().manual_seed(13)
    n_a, n_b = per_group
    rest = 200
    values = torch.cat([torch.zeros(1), torch.full((n_a,), -1.0), torch.full((n_b,), -2.0),
                        torch.full((rest,), -30.0)])
    order = torch.randperm(values.numel(), generator=gen)
    row = values[order]
    seeds = torch.arange(num_rows, device=device) * 7919 + 1
    offsets = torch.zeros_like(seeds)
    for top_p, top_k, lowest in ((0.3, 0, -1.0), (0.5, 0, -2.0),
                                 (0.5, 1 + n_a + n_b + 10, -2.0), (0.5, 1 + n_a, -1.0)):
        params = _params(num_rows, device, temperature=1.0, top_k=top_k, top_p=top_p)
        kept = torch_ref.filter_logits(row[None], params["top_k"][:1].cpu(),
                                       params["top_p"][:1].cpu(),
                                       params["min_p"][:1].cpu())[0] > NEG_INF
        assert float(row[kept].min()) == lowest
        for dtype in (torch.bfloat16, torch.float32):
            logits = row.to(dtype).to(device).expand(num_rows, -1).contiguous()
            got = sample(logits, seeds=seeds, offsets=offsets, **params)
            drawn = row.to(device)[got]
            assert bool((drawn >= lowest).all()), (top_p, top_k, dtype)
            assert bool((drawn == lowest).any()), (top_p, top_k, dtype)


def test_top_p_searches_from_its_lower_bound(chunk_reads):
    _check_top_p_from_its_lower_bound(8, (20, 100), DEVICE)


@pytest.mark.gpu
@needs_gpu
def test_top_p_searches_from_its_lower_bound_gpu():
    _check_top_p_from_its_lower_bound(64, (2000, 10000), torch.device("cuda"))


def _next_below(values: torch.Tensor) -> torch.Tensor:
    """The next value of ``values``' dtype below each (finite, nonzero) value."""
    if values.dtype == torch.float32:
        return torch.nextafter(values, torch.tensor(NEG_INF, device=values.device))
    bits = values.view(torch.int16)
    return torch.where(values > 0, bits - 1, bits + 1).to(torch.int16).view(values.dtype)


def _check_sixteen_bit_min_p_bound(num_rows, per_side, device):
    """Min-p over 16-bit logits read in place (searched over their own keys) keeps exactly
    the logits whose ``x`` reaches the bound: one logit at 0 (the max), ``per_side`` at the
    16-bit value just at or above the bound (kept, and drawn nearly always) and as many at
    the value just below it (dropped; one key too low a bound draws them about half the
    time), shuffled over the chunks; the tokens are those of the float32 copy."""
    gen = torch.Generator().manual_seed(11)
    min_p = 0.05
    for dtype in (torch.bfloat16, torch.float16):
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        every = every[torch.isfinite(every)].float()
        for temperature in (1.0, 0.7):
            # x = logit / T (float32, as the kernels divide); the max's x is 0.
            bound = torch.log(torch.tensor(min_p))
            x = every / temperature
            kept_value = every[x >= bound].min()
            dropped_value = every[x < bound].max()
            values = torch.cat([torch.zeros(1), kept_value.repeat(per_side),
                                dropped_value.repeat(per_side)])
            order = torch.randperm(values.numel(), generator=gen)
            row = values[order].to(dtype)
            dropped = (order > per_side).to(device)  # the positions of dropped values
            logits = row.to(device).expand(num_rows, -1).contiguous()
            params = _params(num_rows, device, temperature=temperature, min_p=min_p)
            seeds = torch.arange(num_rows, device=device) * 7919 + 5
            offsets = torch.zeros_like(seeds)
            got = sample(logits, seeds=seeds, offsets=offsets, **params)
            assert not bool(dropped[got].any()), (dtype, temperature)
            assert bool((got != int(order.argmin())).any()), (dtype, temperature)
            expected = sample(logits.float(), seeds=seeds, offsets=offsets, **params)
            assert torch.equal(got, expected), (dtype, temperature)


def test_sixteen_bit_min_p_bound_is_exact(chunk_reads):
    _check_sixteen_bit_min_p_bound(8, 150, DEVICE)


@pytest.mark.gpu
@needs_gpu
def test_sixteen_bit_min_p_bound_is_exact_gpu():
    _check_sixteen_bit_min_p_bound(64, 60000, torch.device("cuda"))
