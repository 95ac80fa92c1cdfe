"""Weights fetched into L2 during small decode steps (worker_svc/layers/l2_prefetch.py): the
budget's spans, the settings' checks, where in the forward each layer's prefetches are
issued (on the CPU, through the real model, with a launch that records instead),
and on a GPU that greedy outputs are the same with it on, eager and under CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from worker_svc.layers import l2_prefetch
from worker_svc.layers.attention import AttentionMetadata


def test_spans_take_whole_weights_in_order_then_the_head_of_the_next():
    o = torch.zeros(16, 64, dtype=torch.bfloat16)  # 2,048 bytes
    gate_up = torch.zeros(100, 64, dtype=torch.float8_e4m3fn)  # 6,400 bytes
    plan = l2_prefetch.layer_spans([[o, gate_up], [o]], budget=5000, chunk=512)
    first, second = plan
    assert [s.numel() for s in first] == [2048, 2560]  # 5000 - 2048 = 2952, whole chunks
    assert first[0].data_ptr() == o.data_ptr()
    assert first[1].data_ptr() == gate_up.data_ptr()
    assert [s.numel() for s in second] == [2048]
    assert l2_prefetch.layer_spans([[o, gate_up]], budget=100, chunk=512) == [[]]
    with pytest.raises(ValueError, match="budget must be >= 0"):
        l2_prefetch.layer_spans([[o]], budget=-1)


def test_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH", "yes")
    with pytest.raises(ValueError, match="GRIDLLM_L2_PREFETCH must be 0 or 1"):
        l2_prefetch.enabled_from_environment()
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH", "1")
    assert l2_prefetch.enabled_from_environment()
    assert l2_prefetch.budget_bytes(50 << 20) == 25 << 20
    for bad in ("0", "-3", "lots", "inf"):
        monkeypatch.setenv("GRIDLLM_L2_PREFETCH_MB", bad)
        with pytest.raises(ValueError, match="GRIDLLM_L2_PREFETCH_MB must be a positive"):
            l2_prefetch.budget_bytes(50 << 20)
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_MB", "1.5")
    assert l2_prefetch.budget_bytes(50 << 20) == 3 << 19
    assert l2_prefetch.next_budget_bytes() == 0
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_NEXT_MB", "0")
    assert l2_prefetch.next_budget_bytes() == 0
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_NEXT_MB", "-1")
    with pytest.raises(ValueError, match="GRIDLLM_L2_PREFETCH_NEXT_MB must be a number >= 0"):
        l2_prefetch.next_budget_bytes()
    with pytest.raises(ValueError, match="max_rows must be in"):
        l2_prefetch.WeightPrefetch([], 0, max_rows=0)
    with pytest.raises(ValueError, match="spans_after_o must have one entry per layer"):
        l2_prefetch.WeightPrefetch([[], []], 0, spans_after_o=[[]])


def _decode_metadata(seq_lens: list[int], block_size: int, device) -> AttentionMetadata:
    """A decode step of one token per request; request i's blocks are 2i and 2i + 1."""
    b = len(seq_lens)
    table = torch.arange(b * 2, dtype=torch.int32, device=device).view(b, 2)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    pos = lens.long() - 1
    slots = table[torch.arange(b), pos // block_size].long() * block_size + pos % block_size
    return AttentionMetadata(slot_mapping=slots,
                             query_start_loc=torch.arange(b + 1, dtype=torch.int32,
                                                          device=device),
                             seq_lens=lens, block_tables=table, max_query_len=1,
                             max_seq_len=max(seq_lens))


@pytest.fixture
def tiny_llama_runner(tiny_model_dir):
    from worker_svc.model_runner import ModelRunner

    return ModelRunner(ModelConfig(model=tiny_model_dir("llama"), device="cpu"),
                       CacheConfig(block_size=4, num_kv_blocks=64), SchedulerConfig())


def test_each_layer_prefetches_after_its_qkv_and_after_its_o_projection(
        tiny_llama_runner, monkeypatch):
    runner = tiny_llama_runner
    model, caches = runner.model, runner.kv_caches
    layers = model.model.layers
    events = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        attn.qkv_proj.register_forward_hook(lambda *_, i=i: events.append(("qkv", i)))
        attn.o_proj.register_forward_hook(lambda *_, i=i: events.append(("o", i)))

    def record(span, seq_lens, max_kv_tokens):
        events.append(("prefetch", span.data_ptr(), span.numel(), tuple(seq_lens.tolist()),
                       max_kv_tokens))

    ids = torch.tensor([5, 9, 11], dtype=torch.int32)
    meta = _decode_metadata([3, 7, 2], runner.block_size, "cpu")
    positions = meta.seq_lens - 1
    with torch.inference_mode():
        plain = model(ids, positions, caches, meta)
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH", "0")
    assert l2_prefetch.install(model, runner.device, 64, launch=record) is None
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH", "1")
    budget = 40960  # 40 KiB a layer: the o projection (16 KiB), a chunk of gate/up
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_MB", str(budget / (1 << 20)))
    # After the o projection, a chunk of the next layer's q/k/v.
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_NEXT_MB", str(l2_prefetch.CHUNK / (1 << 20)))
    prefetch = l2_prefetch.install(model, runner.device, 64, launch=record)
    try:
        assert prefetch.max_kv_tokens == budget // 64
        events.clear()
        with torch.inference_mode():
            got = model(ids, positions, caches, meta)
        assert torch.equal(got, plain)
        expected = []
        for i, layer in enumerate(layers):
            o = layer.self_attn.o_proj.weight
            gate_up = layer.mlp.gate_up_proj.weight
            o_bytes = o.numel() * o.element_size()
            assert o_bytes < budget < o_bytes + gate_up.numel() * gate_up.element_size()
            head = (budget - o_bytes) // l2_prefetch.CHUNK * l2_prefetch.CHUNK
            spans = [(o.data_ptr(), o_bytes // l2_prefetch.CHUNK * l2_prefetch.CHUNK)]
            spans += [(gate_up.data_ptr(), head)] if head else []
            expected += [("qkv", i)]
            expected += [("prefetch", p, n, (3, 7, 2), budget // 64) for p, n in spans if n]
            expected += [("o", i)]
            if i + 1 < len(layers):
                qkv = layers[i + 1].self_attn.qkv_proj.weight
                expected += [("prefetch", qkv.data_ptr(), l2_prefetch.CHUNK, (3, 7, 2),
                              budget // 64)]
        assert events == expected
        # A prefill step, and a decode step of more rows than MAX_ROWS: none.
        events.clear()
        with torch.inference_mode():
            runner.dummy_forward(5, caches)
            many = [2] * (l2_prefetch.MAX_ROWS + 1)
            meta = _decode_metadata(many, runner.block_size, "cpu")
            model(torch.ones(len(many), dtype=torch.int32), meta.seq_lens - 1, caches, meta)
        # ... nor one whose lengths the gate could not read (int64).
        meta = _decode_metadata([3, 7, 2], runner.block_size, "cpu")
        meta.seq_lens = meta.seq_lens.long()
        assert not prefetch.applies(3, meta)
        assert not [e for e in events if e[0] == "prefetch"]
        # Eager steps (no CUDA graph being captured) do not prefetch either.
        meta = _decode_metadata([3, 7, 2], runner.block_size, "cpu")
        assert prefetch.applies(3, meta)
        prefetch._capturing = lambda: False
        assert not prefetch.applies(3, meta)
        # warm_up launches one span once (the kernel built before any capture).
        events.clear()
        prefetch.warm_up()
        first = layers[0].self_attn.o_proj.weight
        assert events == [("prefetch", first.data_ptr(), l2_prefetch.CHUNK, (0,),
                           budget // 64)]
    finally:
        model.model.weight_prefetch = None
        for layer in layers:
            layer.self_attn.weight_prefetch = None


def test_install_needs_the_gpu_and_the_llama_hooks(tiny_model_dir, monkeypatch):
    from worker_svc.loader import load_model

    monkeypatch.setenv("GRIDLLM_L2_PREFETCH", "1")
    monkeypatch.setenv("GRIDLLM_L2_PREFETCH_MB", "1")
    llama, _ = load_model(ModelConfig(model=tiny_model_dir("llama"), device="cpu"))
    assert l2_prefetch.install(llama, torch.device("cpu"), 64) is None  # the real launch
    opt, _ = load_model(ModelConfig(model=tiny_model_dir("opt"), device="cpu"))
    assert l2_prefetch.decoder_weights(opt) is None
    assert l2_prefetch.install(opt, torch.device("cpu"), 64, launch=print) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_outputs_unchanged_with_l2_prefetch(enforce_eager, tiny_model_dir,
                                                   monkeypatch):
    from gridllm import LLM, SamplingParams
    from kernels.l2_prefetch import supported

    if not supported(torch.device("cuda")):
        pytest.skip("bulk prefetches need compute capability 9.0+")
    model_dir = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(2, 300, (n,), generator=gen).tolist()}
               for n in (5, 40, 17, 3)]
    outputs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("GRIDLLM_L2_PREFETCH", on)
        llm = LLM(model_dir, device="cuda", dtype="bfloat16", attention_backend="triton",
                  enforce_eager=enforce_eager, block_size=16, num_kv_blocks=128,
                  max_num_seqs=8)
        runner = llm.engine.runner
        assert (runner.weight_prefetch is not None) == (on == "1")
        # One request at a time (batch-1 decode, the prefetching steps), then all together.
        single = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        together = llm.generate(prompts, params, use_tqdm=False)
        outputs[on] = [o.outputs[0].token_ids for o in single + together]
        stats = llm.engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
        del llm, runner
        torch.cuda.empty_cache()
    assert outputs["1"] == outputs["0"]
