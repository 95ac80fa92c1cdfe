"""The scheduler's Abort touches only the caller's tenant's requests (real gRPC, a real worker
with a tiny random model)."""

from __future__ import annotations

import pytest

from gridllm.common.auth import TENANT_KEY
from gridllm.v1 import generate_pb2, scheduler_pb2
from tests.scheduler_svc.harness import (
    read_rest,
    run,
    running_scheduler,
    running_worker,
    submit_request,
)
from tests.worker_svc.tiny_models import make_tiny_model

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19]
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def tenant(name: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_KEY, name),) if name else ()


def test_an_abort_from_another_tenant_does_nothing(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            call = stub.Submit(submit_request("shared", PROMPT, max_tokens=MAX_TOKENS,
                                              ignore_eos=True), metadata=tenant("alice"))
            first = await call.read()
            refused = [await stub.Abort(scheduler_pb2.AbortRequest(request_ids=["shared"]),
                                        metadata=tenant(other))
                       for other in ("bob", "")]
            # Still running after both: the aborts had something to end, and did not.
            is_running = "shared" in server.servicer.streams
            rest = await read_rest(call)
            # The owner's abort does work (the same call, the same id).
            own = stub.Submit(submit_request("mine", PROMPT, max_tokens=MAX_TOKENS,
                                             ignore_eos=True), metadata=tenant("alice"))
            await own.read()
            accepted = await stub.Abort(scheduler_pb2.AbortRequest(request_ids=["mine"]),
                                        metadata=tenant("alice"))
            own_rest = await read_rest(own)
            return first, refused, is_running, rest, accepted, own_rest

    first, refused, is_running, rest, accepted, own_rest = run(main())
    assert is_running
    assert [list(r.aborted_request_ids) for r in refused] == [[], []]
    num_tokens = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
    assert num_tokens == MAX_TOKENS
    assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert list(accepted.aborted_request_ids) == ["mine"]
    assert own_rest[-1].finish_reason == generate_pb2.FINISH_REASON_ABORT
