"""Tensor parallelism on CUDA GPUs (``pytest -m gpu``; skipped with fewer than two): NCCL,
CUDA graphs holding the collectives, fp32 greedy ids equal to one GPU's."""

from __future__ import annotations

import gc

import pytest
import torch

from gridllm import LLM, SamplingParams
from tests.gridllm.test_gpu import prompts_of
from tests.gridllm.test_tensor_parallel import SHARDED_ARCHS

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=128,
              max_num_seqs=8, skip_tokenizer_init=True)


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def greedy_ids(llm: LLM, prompts) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("arch", SHARDED_ARCHS)
def test_two_gpus_give_one_gpus_greedy_ids(arch, enforce_eager, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    prompts = prompts_of([3, 17, 9, 30, 1, 21, 40])
    expected = greedy_ids(LLM(model_dir, enforce_eager=enforce_eager, **ENGINE), prompts)
    with LLM(model_dir, tensor_parallel_size=2, enforce_eager=enforce_eager, **ENGINE) as llm:
        # Decode under CUDA graphs unless eager: the graphs hold the all-reduces.
        assert (llm.engine.runner.graph_runner is None) == enforce_eager
        assert greedy_ids(llm, prompts) == expected


def test_llama3_8b_shape_two_gpus_give_one_gpus_greedy_ids():
    engine = dict(ENGINE, num_kv_blocks=64)
    prompts = prompts_of([5, 40, 200], vocab=128000)
    single = LLM("random:llama3-8b", **engine)
    expected = greedy_ids(single, prompts)
    del single  # 32 GB of fp32 weights on GPU 0
    gc.collect()
    torch.cuda.empty_cache()
    with LLM("random:llama3-8b", tensor_parallel_size=2, **engine) as llm:
        assert greedy_ids(llm, prompts) == expected
