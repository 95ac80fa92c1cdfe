"""Qwen2: Llama with biases on q/k/v (not o) and optional per-layer sliding windows."""

from __future__ import annotations

from worker_svc.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False
