"""Benchmark suite: dataset, throughput (and the transformers path), serving metrics, the
serve client loop against a fake router, roofline arithmetic, random presets."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import numpy as np
import pytest
import torch

from gridllm.bench import main as bench_main
from gridllm.bench.datasets import parse_range, random_requests, special_token_ids
from gridllm.bench.gpu_busy import busy_fraction, profile_decode
from gridllm.bench.metrics import RequestRecord, compute_serve_metrics, summarize
from gridllm.bench.roofline import decode_weight_bytes, model_decode_weight_bytes, roofline
from gridllm.bench.serve import ServeConfig, arrival_delays, parse_rates, run_serve_async
from gridllm.bench.throughput import ThroughputConfig, dataset_for, run_throughput
from gridllm.common.random_presets import random_model_config
from gridllm.v1 import generate_pb2, generate_pb2_grpc

TINY = "random:tiny"


# ------------------------------------------------------------------------ dataset
def test_random_requests_lengths_in_range_and_reproducible():
    a = random_requests(200, (3, 17), (5, 9), 50, seed=1, excluded_token_ids=[0, 1, 2])
    b = random_requests(200, (3, 17), (5, 9), 50, seed=1, excluded_token_ids=[0, 1, 2])
    c = random_requests(200, (3, 17), (5, 9), 50, seed=2, excluded_token_ids=[0, 1, 2])
    assert a == b
    assert a != c
    assert all(3 <= r.input_len <= 17 and 5 <= r.output_len <= 9 for r in a)
    ids = np.concatenate([r.prompt_token_ids for r in a])
    assert ids.min() >= 3 and ids.max() < 50
    # Both ends of the ranges are reachable (inclusive ranges).
    assert {r.input_len for r in a} >= {3, 17} and {r.output_len for r in a} >= {5, 9}


def test_random_requests_and_ranges_reject_bad_input():
    with pytest.raises(ValueError, match="num_prompts"):
        random_requests(0, (1, 2), (1, 2), 10)
    with pytest.raises(ValueError, match="input_len_range"):
        random_requests(1, (5, 2), (1, 2), 10)
    with pytest.raises(ValueError, match="no token id"):
        random_requests(1, (1, 2), (1, 2), 3, excluded_token_ids=[0, 1, 2])
    assert parse_range("100:1024", "--x") == (100, 1024)
    assert parse_range("7", "--x") == (7, 7)
    for bad in ("0:5", "5:2", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="--x"):
            parse_range(bad, "--x")


def test_special_token_ids_from_config():
    config = random_model_config("random:llama3-8b")
    assert special_token_ids(None, config) == [128000, 128001]


# ------------------------------------------------------------------------ throughput
def _tiny_config(**kwargs) -> ThroughputConfig:
    base = dict(model=TINY, num_prompts=6, input_len_range=(4, 20), output_len_range=(2, 7),
                max_num_seqs=4, device="cpu", kv_cache_memory=1 << 22, use_tqdm=False)
    return ThroughputConfig(**{**base, **kwargs})


def test_throughput_cli_writes_sane_json(tmp_path):
    out = tmp_path / "tp.json"
    code = bench_main(["throughput", "--model", TINY, "--num-prompts", "6",
                       "--input-len-range", "4:20", "--output-len-range", "2:7",
                       "--max-num-seqs", "4", "--device", "cpu", "--kv-cache-memory",
                       str(1 << 22), "--block-size", "8", "--no-tqdm", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    requests = dataset_for(_tiny_config(), random_model_config(TINY).vocab_size,
                           special_token_ids(None, random_model_config(TINY)))
    r = result["gridllm"]
    assert r["num_requests"] == 6
    # ignore_eos: every request generates exactly its output length.
    assert r["total_output_tokens"] == sum(q.output_len for q in requests)
    assert r["total_input_tokens"] == sum(q.input_len for q in requests)
    assert r["elapsed_s"] > 0
    assert r["requests_per_s"] == pytest.approx(6 / r["elapsed_s"])
    assert r["output_tokens_per_s"] == pytest.approx(r["total_output_tokens"] / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / r["elapsed_s"])
    assert result["config"]["input_len_range"] == [4, 20]
    assert result["config"]["block_size"] == 8
    assert {"device", "date_utc", "cpu_cores"} <= set(result["machine"])
    assert "hf" not in result


def test_throughput_cli_runs_fp8(tmp_path):
    """--quantization fp8 --kv-cache-dtype fp8 reach the engine and the JSON record."""
    out = tmp_path / "tp.json"
    code = bench_main(["throughput", "--model", TINY, "--num-prompts", "3",
                       "--input-len-range", "4:12", "--output-len-range", "2:4",
                       "--max-num-seqs", "4", "--device", "cpu", "--kv-cache-memory",
                       str(1 << 22), "--no-tqdm", "--quantization", "fp8",
                       "--kv-cache-dtype", "fp8", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["quantization"] == "fp8"
    assert result["config"]["kv_cache_dtype"] == "fp8"
    assert result["gridllm"]["num_requests"] == 3
    with pytest.raises(SystemExit):
        bench_main(["throughput", "--model", TINY, "--kv-cache-dtype", "fp4"])


def test_throughput_compare_hf_counts_the_same_tokens():
    config = _tiny_config(num_prompts=5, compare="hf", hf_batch_size=2)
    result = run_throughput(config)
    requests = dataset_for(config, random_model_config(TINY).vocab_size,
                           special_token_ids(None, random_model_config(TINY)))
    hf = result["hf"]
    assert hf["backend"] == "transformers" and hf["batch_size"] == 2
    assert hf["total_output_tokens"] == result["gridllm"]["total_output_tokens"] == sum(
        r.output_len for r in requests)
    # Static batches of 2 (then 1): each row generates its batch's longest output.
    batches = [requests[i:i + 2] for i in range(0, 5, 2)]
    assert hf["generated_tokens"] == sum(len(b) * max(r.output_len for r in b) for b in batches)
    assert result["speedup_vs_hf"] == pytest.approx(
        result["gridllm"]["output_tokens_per_s"] / hf["output_tokens_per_s"])


def test_throughput_config_validates():
    with pytest.raises(ValueError, match="compare"):
        ThroughputConfig(model=TINY, compare="vllm")
    with pytest.raises(ValueError, match="num_prompts"):
        ThroughputConfig(model=TINY, num_prompts=0)


# ------------------------------------------------------------------------ serving metrics
def _synthetic_records() -> list[RequestRecord]:
    r1 = RequestRecord(10, 3, send_time=0.0, chunk_times=[0.1, 0.2, 0.4],
                       chunk_num_tokens=[1, 1, 1], end_time=0.4)
    # One chunk carries two tokens: it is one inter-token gap.
    r2 = RequestRecord(20, 3, send_time=1.0, chunk_times=[1.3, 1.5],
                       chunk_num_tokens=[1, 2], end_time=1.6)
    failed = RequestRecord(30, 3, send_time=1.0, error="UNAVAILABLE: gone")
    return [r1, r2, failed]


def test_serve_metrics_match_hand_computed_values():
    m = compute_serve_metrics(_synthetic_records(), duration_s=2.0)
    assert (m["num_completed"], m["num_failed"]) == (2, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 6
    assert m["requests_per_s"] == pytest.approx(1.0)
    assert m["output_tokens_per_s"] == pytest.approx(3.0)
    assert m["total_tokens_per_s"] == pytest.approx(18.0)
    # TTFT: 0.1 s and 0.3 s; linear-interpolated percentiles between them.
    assert m["ttft_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p90": 280.0,
                                          "p99": 298.0})
    # TPOT: (0.4 - 0.1) / 2 = 0.15 s and (1.5 - 1.3) / (3 - 1) = 0.1 s.
    assert m["tpot_ms"] == pytest.approx({"mean": 125.0, "p50": 125.0, "p90": 145.0,
                                          "p99": 149.5})
    # ITL: gaps 0.1, 0.2 (request 1) and 0.2 (request 2) -> sorted [0.1, 0.2, 0.2].
    assert m["itl_ms"] == pytest.approx({"mean": 500.0 / 3, "p50": 200.0, "p90": 200.0,
                                         "p99": 200.0})
    # E2E: 0.4 s and 0.6 s.
    assert m["e2e_latency_ms"] == pytest.approx({"mean": 500.0, "p50": 500.0, "p90": 580.0,
                                                 "p99": 598.0})


def test_summarize_empty_and_bad_duration():
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError, match="duration_s"):
        compute_serve_metrics([], 0.0)


def test_arrival_delays_poisson_and_infinite():
    assert arrival_delays(5, math.inf) == [0.0] * 5
    delays = arrival_delays(20000, 4.0, seed=3)
    assert delays == arrival_delays(20000, 4.0, seed=3)
    # Exponential gaps: mean 1/rate and standard deviation 1/rate (5-sigma bounds).
    tolerance = 5 * 0.25 / math.sqrt(20000)
    assert abs(np.mean(delays) - 0.25) < tolerance
    assert abs(np.std(delays) - 0.25) < 2 * tolerance
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError, match="--sweep"):
        parse_rates("1,0")


# ------------------------------------------------------------------------ serve client loop
class _FakeRouter(generate_pb2_grpc.GenerationServicer):
    """A Generation servicer streaming one token per response (token id = position)."""

    def __init__(self):
        self.pb = generate_pb2
        self.prompt_lens: list[int] = []

    async def Generate(self, request, context):
        self.prompt_lens.append(len(request.prompt_token_ids.ids))
        max_tokens = request.sampling_params.max_tokens
        for i in range(max_tokens):
            await asyncio.sleep(0.001)
            last = i == max_tokens - 1
            yield self.pb.GenerateResponse(
                request_id="r", token_ids=[i],
                finish_reason=self.pb.FINISH_REASON_LENGTH if last else 0,
                usage=self.pb.Usage(prompt_tokens=len(request.prompt_token_ids.ids),
                                    completion_tokens=max_tokens) if last else None)

    async def GetModelInfo(self, request, context):
        return self.pb.GetModelInfoResponse(model="fake", max_model_len=4096, vocab_size=100,
                                            eos_token_id=2, block_size=16)


def test_serve_loop_against_a_fake_router():
    async def scenario():
        fake = _FakeRouter()
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            config = ServeConfig(target=f"127.0.0.1:{port}", num_prompts=6,
                                 input_len_range=(3, 9), output_len_range=(2, 5),
                                 request_rate=200.0, max_concurrency=2, use_tqdm=False)
            return fake, await run_serve_async(config)
        finally:
            await server.stop(None)

    fake, result = asyncio.run(scenario())
    requests = random_requests(6, (3, 9), (2, 5), 100, seed=0, excluded_token_ids=[2])
    assert result["num_completed"] == 6 and result["num_failed"] == 0
    assert sorted(fake.prompt_lens) == sorted(r.input_len for r in requests)
    assert result["total_output_tokens"] == sum(r.output_len for r in requests)
    # The fake sleeps 1 ms before each response, so a request takes at least 1 ms a token
    # and its first token 1 ms (a busy client reading two responses in one turn shortens
    # the gap it sees between them, never these spans).
    mean_output_len = sum(r.output_len for r in requests) / len(requests)
    assert result["e2e_latency_ms"]["mean"] >= mean_output_len
    assert result["ttft_ms"]["mean"] >= 1.0 and result["itl_ms"]["p50"] > 0
    assert result["model"] == "fake" and result["config"]["request_rate"] == 200.0


# ------------------------------------------------------------------------ roofline, presets
def test_decode_weight_bytes_counts_untied_embeddings_out():
    config = random_model_config(TINY)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = h * (h + 2 * kv) + h * h + h * 2 * i + i * h + 2 * h
    expected = config.num_hidden_layers * per_layer + h + v * h  # + final norm + lm_head
    assert model_decode_weight_bytes(TINY, torch.float32) == 4 * expected
    assert model_decode_weight_bytes(TINY, torch.bfloat16) == 2 * expected
    tied = torch.nn.Module()
    tied.embed = torch.nn.Embedding(10, 4)
    tied.head = torch.nn.Linear(4, 10, bias=False)
    tied.head.weight = tied.embed.weight
    assert decode_weight_bytes(tied) == 10 * 4 * 4


def test_roofline_arithmetic_and_cpu():
    r = roofline(2_000_000_000, {"device": "x", "copy_bandwidth_gbps": 1000.0})
    assert r["roofline_tokens_per_s"] == pytest.approx(500.0)
    assert r["roofline_ms_per_token"] == pytest.approx(2.0)
    assert roofline(10, {"copy_bandwidth_gbps": None})["roofline_tokens_per_s"] is None


def test_busy_fraction_union_of_intervals():
    # [0,2] and [1,3] overlap -> 3 units busy; [5,6] -> 1 more; span [0,8].
    assert busy_fraction([(5, 6), (0, 2), (1, 3)], 0, 8) == pytest.approx(0.5)


def test_random_presets_shapes_and_unknown_name():
    llama = random_model_config("random:llama3-8b")
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads,
            llama.num_key_value_heads, llama.intermediate_size, llama.vocab_size,
            llama.max_position_embeddings) == (4096, 32, 32, 8, 14336, 128256, 8192)
    assert llama.rope_parameters["rope_type"] == "llama3"
    qwen = random_model_config("random:qwen3-0.6b")
    assert qwen.architectures == ["Qwen3ForCausalLM"] and qwen.tie_word_embeddings
    with pytest.raises(ValueError, match="random:tiny"):
        random_model_config("random:nope")


def test_random_model_weights_are_small_seeded_and_on_the_device():
    from worker_svc.layers.selector import get_attention_backend
    from worker_svc.random_model import INIT_STD, build_random_model

    backend = get_attention_backend("torch", torch.device("cpu"))
    a, _ = build_random_model(TINY, backend, torch.device("cpu"), torch.bfloat16, seed=5)
    b, _ = build_random_model(TINY, backend, torch.device("cpu"), torch.bfloat16, seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=False):
        assert pa.dtype == torch.bfloat16
        assert torch.equal(pa, pb), name
    weight = a.model.layers[0].mlp.gate_up_proj.weight.float()
    assert weight.std().item() == pytest.approx(INIT_STD, rel=0.1)
    assert torch.equal(a.model.norm.weight.float(), torch.ones(a.config.hidden_size))


def test_llm_runs_a_random_preset_without_tokenizer():
    from gridllm import LLM, SamplingParams

    llm = LLM(TINY, device="cpu", num_kv_blocks=64, max_num_seqs=4)
    assert llm.tokenizer is None
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].text == ""


def test_gpu_busy_prompt_steps_are_chunks_of_the_prompts():
    # 2 prompts of 64 tokens at 32 a step: the 4 measured steps are prompt chunks only.
    result = profile_decode(TINY, batch_size=2, input_len=64, num_steps=4, prompt_chunk=32,
                            host_profile=True)
    assert result["tokens_per_step"] == [32, 32, 32, 32]
    assert result["prompt_chunk"] == 32 and result["ms_per_step_unprofiled"] > 0
    host = result["host_ms_per_step"]
    assert host["(all functions, own time)"] > 0
    # With callees, most first; the engine's step among them (on Python 3.12+ cProfile
    # also sees other threads' functions, which the step's own time does not include).
    with_callees = list(host["(with callees)"].items())
    assert [ms for _, ms in with_callees] == sorted((ms for _, ms in with_callees),
                                                    reverse=True)
    assert any("engine.py" in where and " step x1" in where and ms > 0
               for where, ms in with_callees)
    decode = profile_decode(TINY, batch_size=3, input_len=16, num_steps=2)
    assert decode["tokens_per_step"] == [3, 3] and decode["temperature"] == 0.0


def test_gpu_busy_draws_at_a_temperature(monkeypatch):
    """``temperature``: the measured requests draw (seeded) instead of taking the argmax."""
    from gridllm.common.sampling_params import SamplingParams

    seen = []
    init = SamplingParams.__post_init__

    def record(self):
        init(self)
        seen.append((self.max_tokens, self.temperature, self.top_p, self.seed))

    monkeypatch.setattr(SamplingParams, "__post_init__", record)
    decode = profile_decode(TINY, batch_size=2, input_len=16, num_steps=2, temperature=0.8)
    assert decode["tokens_per_step"] == [2, 2] and decode["temperature"] == 0.8
    # The warm-up's 8 tokens a request and the measured requests' 2 x 2 + 8, all drawn.
    drawn = {p for p in seen if p[0] in (8, 12)}
    assert drawn == {(8, 0.8, 0.95, 0), (12, 0.8, 0.95, 0)}


def test_gpu_busy_prompt_steps_must_fit_the_prompts():
    with pytest.raises(ValueError, match="prompt_chunk"):
        profile_decode(TINY, batch_size=2, input_len=64, num_steps=5, prompt_chunk=32)


def test_gpu_busy_records_the_machine(tmp_path, capsys):
    from gridllm.bench import gpu_busy

    out = tmp_path / "busy.json"
    assert gpu_busy.main(["--model", TINY, "--batch-size", "2", "--input-len", "8",
                          "--num-steps", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    machine = json.loads(out.read_text())["machine"]
    assert machine["device"] == "cpu" and machine["date_utc"]
