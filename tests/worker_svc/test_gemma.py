"""Gemma 2/3 specifics: every feature the parity tests rely on changes the outputs of the
tiny models, and configs gridllm cannot run are refused."""

import pytest
import torch
from transformers import AutoConfig

from gridllm.common.config import ModelConfig
from tests.worker_svc.hf_reference import hf_prompt_logits
from tests.worker_svc.test_models import _caches, _packed_metadata
from worker_svc.layers.attention import AttentionBackend
from worker_svc.loader import load_model
from worker_svc.models.gemma import Gemma2ForCausalLM

PROMPT_LEN = 23  # longer than the tiny models' window of 6


def _logits(model, hf_config, prompt):
    metadata = _packed_metadata([len(prompt)], [list(range(-(-len(prompt) // 4)))])
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)),
                       _caches(hf_config, 8), metadata)
        return model.compute_logits(hidden)


def _disable_window(model):
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None


def _disable_attn_cap(model):
    for layer in model.model.layers:
        layer.self_attn.logit_softcap = None


def _disable_final_cap(model):
    model.final_logit_softcap = None


def _disable_query_scalar(model):
    for layer in model.model.layers:
        layer.self_attn.scale = layer.self_attn.head_dim ** -0.5


@pytest.mark.parametrize("arch, change", [
    ("gemma2", _disable_window), ("gemma2", _disable_attn_cap),
    ("gemma2", _disable_final_cap), ("gemma2", _disable_query_scalar),
    ("gemma3", _disable_window), ("gemma3", _disable_query_scalar),
])
def test_each_feature_changes_the_logits(arch, change, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    model, hf_config = load_model(ModelConfig(model=model_dir, device="cpu"))
    prompt = torch.randint(2, 320, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5))
    prompt = prompt.tolist()
    want = hf_prompt_logits(model_dir, prompt)
    torch.testing.assert_close(_logits(model, hf_config, prompt), want, atol=1e-4, rtol=1e-4)
    change(model)
    # Without the feature the model no longer matches: the parity tests would catch its loss.
    assert (_logits(model, hf_config, prompt) - want).abs().max() > 1e-2


def test_gemma3_local_layers_use_their_own_rope_base(tiny_model_dir):
    model, _ = load_model(ModelConfig(model=tiny_model_dir("gemma3"), device="cpu"))
    local, global_ = (model.model.layers[i].self_attn.rotary_emb for i in (0, 1))
    assert not torch.allclose(local.cos_sin_cache, global_.cos_sin_cache)


class _NoSoftcapBackend(AttentionBackend):
    name = "nosoftcap"


def test_softcap_needs_a_backend_that_has_it(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("gemma2"))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        Gemma2ForCausalLM(config, _NoSoftcapBackend())
    config.attn_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="attn_logit_softcapping must be positive"):
        Gemma2ForCausalLM(config, _NoSoftcapBackend())


def test_bidirectional_gemma_is_refused(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("gemma3"))
    config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma2ForCausalLM(config, _NoSoftcapBackend())
