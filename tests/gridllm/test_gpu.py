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


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
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
