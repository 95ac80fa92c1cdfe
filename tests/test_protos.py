"""The committed generated code matches the .proto files."""

from __future__ import annotations

from pathlib import Path

from gridllm import protos_gen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = protos_gen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed_dir = protos_gen.REPO_ROOT / "gridllm" / "v1"
    fresh_names = {p.name for p in fresh}
    committed_names = {p.name for p in committed_dir.glob("*_pb2*.py*")}
    assert fresh_names == committed_names, "generated file set differs: run `make protos`"
    stale = [p.name for p in fresh if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    assert not stale, f"generated code is stale for {stale}: run `make protos`"


def test_public_names_exist() -> None:
    from gridllm.v1 import generate_pb2 as pb

    request = pb.GenerateRequest(request_id="r", prompt="hi", priority=1,
                                 sampling_params=pb.SamplingParams(temperature=0.0))
    assert request.WhichOneof("input") == "prompt"
    request.prompt_token_ids.ids.extend([1, 2])
    assert request.WhichOneof("input") == "prompt_token_ids"
    request.chat.messages.add(role="user", content="hi")
    assert request.WhichOneof("input") == "chat"
    assert pb.FinishReason.Name(pb.FINISH_REASON_STOP) == "FINISH_REASON_STOP"
    response = pb.GenerateResponse(request_id="r", text="x", token_ids=[3],
                                   finish_reason=pb.FINISH_REASON_LENGTH,
                                   usage=pb.Usage(prompt_tokens=2, completion_tokens=1))
    assert response.usage.completion_tokens == 1
    stats = pb.GetServerStatsResponse(num_requests_running=0, num_requests_waiting=0,
                                      prefix_cache_queries=0, prefix_cache_hits=0)
    stats.workers.add(worker_id="w", kv_blocks_total=4, kv_blocks_free=4)
    assert {"Generate", "Tokenize", "GetModelInfo", "GetServerStats"} <= set(
        pb.DESCRIPTOR.services_by_name["Generation"].methods_by_name)
