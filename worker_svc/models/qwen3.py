"""Qwen3: Llama with a per-head RMSNorm on q and k before the rotation."""

from __future__ import annotations

from worker_svc.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    has_qk_norm = True
