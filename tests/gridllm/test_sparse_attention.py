"""The sparse attention option end to end: ``local:W`` is a W-token window on every layer
(greedy ids equal transformers' for the same weights declared with that window, and the KV
blocks before the window are given back); ``strided:S`` gives the same ids on the torch and
the Triton backends (the kernels skip what the torch path masks) and differs from dense."""

import json
import os
import shutil

import pytest

from gridllm import LLM, SamplingParams
from gridllm.common.config import parse_sparse_attention
from tests.gridllm.test_llm import assert_no_leak, prompts_of, token_prompts
from tests.worker_svc.hf_reference import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _as_mistral(llama_dir: str, window: int, tmp_path) -> str:
    """The same weights, declared as a Mistral with a ``window``-token sliding window."""
    path = str(tmp_path / "as-mistral")
    shutil.copytree(llama_dir, path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                  sliding_window=window)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def test_local_is_a_window_on_every_layer_and_gives_blocks_back(tiny_model_dir, tmp_path):
    llama = tiny_model_dir("llama")
    prompts = prompts_of([30, 9, 41], seed=3)
    mistral = _as_mistral(llama, 12, tmp_path)
    want = [hf_greedy(mistral, p, GREEDY.max_tokens)[0] for p in prompts]
    dense = LLM(llama, block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)
    local = LLM(llama, block_size=4, num_kv_blocks=128, max_num_batched_tokens=16,
                sparse_attention="local:12")
    assert local.engine.scheduler.limits.kv_window == 12
    assert dense.engine.scheduler.limits.kv_window is None
    got = local.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert_no_leak(local)
    # The window changes what a 30-token prompt computes: dense disagrees somewhere.
    got_dense = dense.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got_dense] != want


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_strided_is_alike_on_both_backends_and_not_dense(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    prompts = prompts_of([37, 6, 52], seed=8)

    def run(**kwargs):
        llm = LLM(model_dir, block_size=4, num_kv_blocks=128, max_num_batched_tokens=24,
                  **kwargs)
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_no_leak(llm)
        return [o.outputs[0].token_ids for o in outputs]

    torch_ids = run(sparse_attention="strided:5", attention_backend="torch")
    assert run(sparse_attention="strided:5", attention_backend="triton") == torch_ids
    assert run(attention_backend="torch") != torch_ids


@pytest.mark.parametrize("value", ["strided", "local:0", "dense:8", "strided:x", 12])
def test_bad_patterns_name_the_field(value):
    with pytest.raises(ValueError, match="sparse_attention"):
        parse_sparse_attention(value)
    with pytest.raises(ValueError, match="sparse_attention"):
        LLM("random:tiny", sparse_attention=value)
