"""End to end on a CUDA GPU (``pytest -m gpu``; skipped without one): Triton kernels,
CUDA graphs, fp32 greedy parity with transformers and bf16 logits accuracy."""

import random

import pytest
import torch

from gridllm import LLM, SamplingParams
from gridllm.common.config import ModelConfig
from tests.worker_svc.hf_reference import hf_greedy, hf_prompt_logits
from tests.worker_svc.tiny_models import TINY_ARCHS
from worker_svc.layers.ops import set_use_triton
from worker_svc.layers.selector import get_attention_backend
from worker_svc.loader import load_model
from worker_svc.model_runner import kv_cache_geometry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts_of(lengths, seed=0, vocab=320):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_fp32():
    # Parity needs IEEE fp32 matmuls (no TF32) in both engines.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# Interleaved local/global attention (windows, soft-capping, q/k norms) on the kernels too.
WINDOWED_ARCHS = ["gemma2", "gemma3", "mistral-w12"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS) + WINDOWED_ARCHS)
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_fp32_greedy_matches_transformers(arch, enforce_eager, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    llm = LLM(model_dir, device="cuda", dtype="float32", attention_backend="triton",
              enforce_eager=enforce_eager, block_size=16, num_kv_blocks=128, max_num_seqs=8)
    assert (llm.engine.runner.graph_runner is None) == enforce_eager
    prompts = prompts_of([3, 17, 9, 30, 1, 21, 40])
    expected = [hf_greedy(model_dir, p, GREEDY.max_tokens)[0] for p in prompts]
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    # The prompts' step ran through the graphs cut at attention.
    piecewise = llm.engine.runner.piecewise_runner
    assert (piecewise is None) == enforce_eager
    assert enforce_eager or piecewise.num_replays > 0


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma2", "qwen3"])
def test_chunked_mixed_steps_through_graphs_cut_at_attention_match_transformers(
        arch, tiny_model_dir):
    """Steps of at most 64 tokens (prompt chunks beside decodes), every one replayed from
    the graphs cut at attention, padded to 16-token sizes: greedy ids identical to
    transformers (rotary fused or not, KV groups with windows, q/k norms)."""
    model_dir = tiny_model_dir(arch)
    llm = LLM(model_dir, device="cuda", dtype="float32", attention_backend="triton",
              block_size=16, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64)
    piecewise = llm.engine.runner.piecewise_runner
    assert piecewise.sizes == [16, 32, 48, 64]
    prompts = prompts_of([3, 17, 9, 30, 1, 21, 40, 90], seed=3)
    expected = [hf_greedy(model_dir, p, GREEDY.max_tokens)[0] for p in prompts]
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert piecewise.num_replays >= 3
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_graphs_cut_at_attention_match_the_eager_forward():
    """Steps of 20 to 2,048 tokens (and past the largest size, eager): the same greedy ids
    with the graphs as without them, on one engine."""
    llm = LLM("random:qwen3-0.6b", device="cuda", dtype="float32", max_model_len=4096,
              max_num_seqs=16, max_num_batched_tokens=2048, num_kv_blocks=1024,
              enable_prefix_caching=False)
    runner = llm.engine.runner
    prompts = prompts_of([20, 100, 300, 700, 1500, 2100, 5, 60], seed=5, vocab=1000)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    with_graphs = llm.generate(inputs, params, use_tqdm=False)
    assert runner.piecewise_runner.num_replays > 0
    runner.piecewise_runner = None
    eager = llm.generate(inputs, params, use_tqdm=False)
    assert ([o.outputs[0].token_ids for o in with_graphs]
            == [o.outputs[0].token_ids for o in eager])


def test_early_reads_keep_fp8_greedy_ids(monkeypatch):
    """Decode kernels that read the step's inputs and cached keys before they wait for the
    kernel before (``EARLY_READS``: the rotary KV write, decode attention over an FP8
    cache) give the greedy ids of the same engine with them off: FP8 weights and KV cache,
    CUDA graphs, contexts from 5 to 700 tokens decoded across split-count changes."""
    import gc

    from kernels import paged_decode_attention, rotary_kv_cache_write

    prompts = prompts_of([5, 30, 100, 300, 700], seed=7, vocab=1000)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    runs = []
    for early in (False, True):
        monkeypatch.setattr(paged_decode_attention, "EARLY_READS", early)
        monkeypatch.setattr(rotary_kv_cache_write, "EARLY_READS", early)
        llm = LLM("random:qwen3-0.6b", device="cuda", dtype="bfloat16", max_model_len=2048,
                  max_num_seqs=8, num_kv_blocks=512, quantization="fp8",
                  kv_cache_dtype="fp8")
        one_by_one = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                      for p in prompts]
        together = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in one_by_one + together])
        stats = llm.engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]


def hf_bf16_logits(model_dir, prompt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        return model(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_bf16_logits_within_one_percent(arch, tiny_model_dir):
    """bf16 logits against the fp32 transformers reference: within 1e-2 relative error, or
    no worse than transformers' own bf16 forward where the tiny random model's conditioning
    alone costs more than that."""
    model_dir = tiny_model_dir(arch)
    device = torch.device("cuda")
    backend = get_attention_backend("triton", device)
    set_use_triton(True)
    model, hf_config = load_model(ModelConfig(model_dir, dtype="bfloat16", device="cuda"),
                                  backend, device)
    prompt = prompts_of([37], seed=11)[0]
    block_size = 16
    num_blocks = -(-len(prompt) // block_size)
    num_layers, num_kv_heads, head_dim = kv_cache_geometry(hf_config)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [(torch.zeros(shape, dtype=torch.bfloat16, device=device),
               torch.zeros(shape, dtype=torch.bfloat16, device=device))
              for _ in range(num_layers)]
    from worker_svc.layers.attention import AttentionMetadata

    n = len(prompt)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt, device=device), torch.arange(n, device=device),
                       caches, meta)
        logits = model.compute_logits(hidden).cpu()
    reference = hf_prompt_logits(model_dir, prompt)
    rel = relative_error(logits, reference)
    hf_rel = relative_error(hf_bf16_logits(model_dir, prompt), reference)
    print(f"{arch}: bf16 logits relative error gridllm {rel:.2e}, transformers {hf_rel:.2e}")
    assert rel < max(1e-2, 1.25 * hf_rel)


# Every kernel the hook saw in this process: a later test may find every variant already
# built (Triton keeps compiled kernels in memory), so "the hook fired" is checked over all.
_SEEN_COMPILATIONS: list[str] = []


@pytest.fixture
def triton_compilations(monkeypatch):
    """The Triton kernels compiled (or loaded from the disk cache) from now on, as
    ``name[key]``: every miss of a kernel's in-memory cache goes through
    ``JITFunction._do_compile`` (Gluon kernels too). Triton's compile hooks
    (``triton.knobs``) serialize every constexpr to JSON first, which fails on a Gluon
    kernel's layout arguments."""
    from triton.runtime.jit import JITFunction

    if not hasattr(JITFunction, "_do_compile"):
        pytest.skip("this Triton compiles elsewhere than JITFunction._do_compile")
    compiled: list[str] = []
    do_compile = JITFunction._do_compile

    def recording(self, key, *args, **kwargs):
        name = f"{getattr(self.fn, '__name__', self)}[{key}]"
        compiled.append(name)
        _SEEN_COMPILATIONS.append(name)
        return do_compile(self, key, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", recording)
    yield compiled


def _mixed_serving_run(llm, rng):
    """Prompt lengths across every prefill tile and block-table class, contexts across the
    split-KV classes, prefix-cache hits (short chunks over long contexts), varying batch
    sizes, and every sampling feature (the penalty and plain sampling kernels)."""
    vocab = llm.engine.vocab_size
    lengths = [1, 2, 5, 15, 16, 17, 31, 33, 64, 65, 100, 129, 200, 257, 300, 520, 1100, 2100,
               3000]
    prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]
    features = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, seed=7),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5,
                       frequency_penalty=0.3),
        SamplingParams(temperature=0.0, logprobs=5, prompt_logprobs=2),
        SamplingParams(temperature=0.7, logit_bias={5: 3.0}, min_tokens=1),
        SamplingParams(temperature=0.9, allowed_token_ids=list(range(100, 400))),
        SamplingParams(temperature=0.6, logits_processors=["no_repeat_ngram"],
                       extra_args={"no_repeat_ngram_size": 3}),
    ]
    for batch_size in (1, 3, 8, 19, len(prompts)):
        picked = [rng.randrange(len(prompts)) for _ in range(batch_size)]
        params = [features[rng.randrange(len(features))].clone(
            max_tokens=rng.choice([1, 8, 40]), ignore_eos=True) for _ in picked]
        llm.generate([{"prompt_token_ids": prompts[i]} for i in picked], params,
                     use_tqdm=False)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_no_triton_compilation_after_start(enforce_eager, fp8, triton_compilations):
    """Every Triton variant the serving path launches was built in the runner's warm-up;
    with FP8 weights and KV cache too (the one-warp decode kernel's split counts, the FP8
    weight-only kernel's row classes in eager steps of 9-16 tokens)."""
    triton_compilations.clear()
    quant = dict(quantization="fp8", kv_cache_dtype="fp8") if fp8 else {}
    llm = LLM("random:qwen3-0.6b", device="cuda", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=32, max_num_batched_tokens=1024, num_kv_blocks=2048,
              enforce_eager=enforce_eager, **quant)
    assert _SEEN_COMPILATIONS, "the warm-up built no Triton kernel: is the hook wired?"
    triton_compilations.clear()
    _mixed_serving_run(llm, random.Random(0))
    assert triton_compilations == []
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_no_triton_compilation_for_structured_outputs_after_start(triton_compilations,
                                                                  tmp_path):
    """The token-bitmask variant that constrained rows of a mixed batch launch was built in
    the warm-up (a random-weight model borrows the tiny tokenizer, so grammars compile)."""
    from gridllm import StructuredOutputsParams
    from tests.e2e.tiny_model import build_tokenizer

    build_tokenizer(str(tmp_path))
    llm = LLM("random:qwen3-0.6b", tokenizer=str(tmp_path), device="cuda", dtype="bfloat16",
              max_model_len=1024, max_num_seqs=8, num_kv_blocks=512)
    triton_compilations.clear()
    specs = [StructuredOutputsParams(choice=["yes", "no"]),
             StructuredOutputsParams(regex=r"[a-z]{1,8}"),
             StructuredOutputsParams(json_object=True, disable_any_whitespace=True)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=16, structured_outputs=spec)
              for i, spec in enumerate(specs)] + [SamplingParams(temperature=0, max_tokens=16)]
    outs = llm.generate(["Hello world", "The quick brown fox", "café", "hi"], params,
                        use_tqdm=False)
    assert all(o.outputs[0].finish_reason is not None for o in outs)
    assert llm.engine.runner.structured_outputs.num_masked_steps > 0
    assert triton_compilations == []
