"""Mistral: Llama with sliding-window attention (``config.sliding_window``) and no biases."""

from __future__ import annotations

from worker_svc.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    qkv_bias = False
    o_bias = False
