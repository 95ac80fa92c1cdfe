"""The scheduler checks every request limit itself when it admits a Submit (the router is not
its only client) and reports the limits in GetInfo; real worker and scheduler on loopback."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from gridllm.common.config import RequestLimits, SchedulerConfig
from gridllm.common.convert import request_limits_from_pb
from gridllm.v1 import generate_pb2, scheduler_pb2
from tests.scheduler_svc.harness import (
    MAX_NUM_BATCHED_TOKENS,
    collect,
    run,
    running_scheduler,
    running_worker,
    submit_request,
)
from tests.worker_svc.tiny_models import make_tiny_model

LIMITS = RequestLimits(max_n=4, max_logprobs=3, max_num_stop_strings=2, max_stop_string_len=5,
                       max_num_stop_token_ids=3, max_num_logit_bias=2)
SP = generate_pb2.SamplingParams
# The tiny model's context.
MAX_MODEL_LEN = 256

BAD = [
    ("logprobs", "max_logprobs", SP(logprobs=4)),
    ("prompt_logprobs", "max_logprobs", SP(prompt_logprobs=49152)),
    ("stop", "max_num_stop_strings", SP(stop=["a", "b", "c"])),
    ("stop", "max_stop_string_len", SP(stop=["abcdef"])),
    ("stop_token_ids", "max_num_stop_token_ids", SP(stop_token_ids=[2, 3, 4, 5])),
    ("logit_bias", "max_num_logit_bias", SP(logit_bias={2: 1.0, 3: 1.0, 4: 1.0})),
    ("max_tokens", "at most 246 for this prompt", SP(max_tokens=247)),
    ("allowed_token_ids", "at most one entry per token", SP(allowed_token_ids=[5] * 321)),
    ("logits_processors", "at most once", SP(logits_processors=["no_repeat_ngram"] * 2)),
    ("prompt_token_ids", "output_token_ids 246; max_model_len is 256", None),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_submit_checks_the_limits_and_get_info_reports_them(model_path):
    config = SchedulerConfig(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                             **dataclasses.asdict(LIMITS))

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address], scheduler_config=config) as (server, stub):
            info = await stub.GetInfo(scheduler_pb2.GetSchedulerInfoRequest())
            errors = []
            for k, (_, _, params) in enumerate(BAD):
                request = scheduler_pb2.SubmitRequest(request_id=f"bad{k}",
                                                      prompt_token_ids=[5] * 10)
                if params is None:  # resumed output that no longer fits the context
                    request.output_token_ids.extend([6] * (MAX_MODEL_LEN - 10))
                else:
                    request.sampling_params.CopyFrom(params)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await collect(stub, request)
                errors.append((exc.value.code(), exc.value.details()))
            # Undecodable bytes are a bad argument too.
            async with grpc.aio.insecure_channel(server.address) as channel:
                raw = channel.unary_stream("/gridllm.v1.Scheduler/Submit",
                                           request_serializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await raw(b"\x0a\x02\xff\xfe", timeout=5).read()
            errors.append((exc.value.code(), exc.value.details()))
            # At the limits (and with max_tokens left unset on a long prompt) it serves.
            at_limit = submit_request("ok", [5] * (MAX_MODEL_LEN - 3), logprobs=3,
                                      prompt_logprobs=3, stop_token_ids=[2, 3, 4])
            at_limit.sampling_params.ClearField("max_tokens")
            tokens, _ = await collect(stub, at_limit)
            bm = server.pool.links[worker.worker_id].scheduler.block_manager
            await asyncio.sleep(0.1)
            return info, errors, tokens, bm.num_free_blocks == bm.num_blocks

    info, errors, tokens, all_free = run(main())
    assert request_limits_from_pb(info.request_limits) == LIMITS
    for (field, limit, _), (code, details) in zip(BAD, errors, strict=False):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
        assert details.startswith(field) and limit in details, (field, details)
    assert errors[-1][0] == grpc.StatusCode.INVALID_ARGUMENT
    # The default max_tokens (16) was cut to the 3 tokens the prompt leaves.
    assert len(tokens) == 3
    assert all_free
