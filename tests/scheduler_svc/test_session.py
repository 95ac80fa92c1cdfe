"""The Session stream: many requests over one call, one message per step for all of them;
bad submits and refusals end only their own request; a broken session frees its blocks.
Real worker and scheduler on loopback, compared against the Submit path."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from gridllm.common.config import SchedulerConfig
from gridllm.common.grpc_utils import RETRY_AFTER_KEY
from gridllm.v1 import generate_pb2, scheduler_pb2
from tests.scheduler_svc.harness import (
    collect,
    run,
    running_scheduler,
    running_worker,
    submit_request,
    wait_until,
)
from tests.worker_svc.tiny_models import make_tiny_model

PROMPTS = [[40 + i, 41 + i, 42, 43, 44 + i] for i in range(8)]
MESSAGES = "gridllm:scheduler_stream_messages_total"
STEPS = "gridllm:iteration_tokens_total_count"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def submit(request: scheduler_pb2.SubmitRequest, tenant: str = "") -> scheduler_pb2.SessionRequest:
    return scheduler_pb2.SessionRequest(
        submit=scheduler_pb2.SessionSubmit(request=request, tenant=tenant))


class SessionReader:
    """Reads a Session call, keeping each request's tokens, finish and error."""

    def __init__(self, call):
        self.call = call
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, int] = {}
        self.errors: dict[str, scheduler_pb2.SessionError] = {}
        self.num_messages = 0

    async def read_until(self, predicate, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                message = await self.call.read()
                assert message is not grpc.aio.EOF, "the session ended"
                self.num_messages += 1
                for update in message.updates:
                    self.tokens.setdefault(update.request_id, []).extend(update.token_ids)
                    if update.finish_reason:
                        self.finish[update.request_id] = update.finish_reason
                for error in message.errors:
                    self.errors[error.request_id] = error

    def ended(self, req_ids) -> bool:
        return all(r in self.finish or r in self.errors for r in req_ids)


def sample(server, name: str, labels: dict | None = None) -> float:
    return server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def all_blocks_free(stats: generate_pb2.GetServerStatsResponse) -> bool:
    return (stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            and all(w.kv_blocks_free == w.kv_blocks_total for w in stats.workers))


async def blocks_freed(stub, attempts: int) -> bool:
    """True once the scheduler reports every block free, polled ``attempts`` times 50 ms
    apart; False if it never does."""
    for _ in range(attempts):
        if all_blocks_free(await stub.GetStats(generate_pb2.GetServerStatsRequest())):
            return True
        await asyncio.sleep(0.05)
    return False


def test_a_session_sends_one_message_per_step_with_the_submit_tokens(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            requests = [submit_request(f"s{i}", p, max_tokens=24, ignore_eos=True)
                        for i, p in enumerate(PROMPTS)]
            submitted = await asyncio.gather(*(collect(stub, r) for r in requests))
            submit_messages = sample(server, MESSAGES, {"rpc": "Submit"})
            steps_before = sample(server, STEPS)
            call = stub.Session()
            for i, p in enumerate(PROMPTS):
                await call.write(submit(submit_request(f"x{i}", p, max_tokens=24,
                                                       ignore_eos=True)))
            reader = SessionReader(call)
            await reader.read_until(lambda: reader.ended([f"x{i}" for i in range(8)]))
            num_open = sample(server, "gridllm:scheduler_sessions_open")
            session_messages = sample(server, MESSAGES, {"rpc": "Session"})
            steps = sample(server, STEPS) - steps_before
            call.cancel()
            return ([t for t, _ in submitted], reader, submit_messages, session_messages,
                    steps, num_open)

    submitted, reader, submit_messages, session_messages, steps, num_open = run(main())
    assert not reader.errors
    for i, want in enumerate(submitted):
        assert len(want) == 24
        assert reader.tokens[f"x{i}"] == want, i
        assert reader.finish[f"x{i}"] == generate_pb2.FINISH_REASON_LENGTH
    assert num_open == 1
    assert session_messages == reader.num_messages
    # One message per step at most (fewer when the writer fell behind and merged), where
    # Submit wrote one per request per step.
    assert session_messages <= steps
    assert submit_messages >= 8 * 24 * 0.5
    assert session_messages * 4 <= submit_messages


def test_refusals_and_bad_submits_end_only_their_own_request(model_path):
    one_at_a_time = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_logprobs=3)

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address], scheduler_config=one_at_a_time,
                                  max_num_queued_reqs=2) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            lengths = [60, 12, 12]  # q0 runs long enough to be held mid-run
            undisturbed = [(await collect(stub, submit_request(
                f"u{i}", p, max_tokens=n, ignore_eos=True)))[0]
                for i, (p, n) in enumerate(zip(PROMPTS[:3], lengths, strict=True))]
            call = stub.Session()
            reader = SessionReader(call)
            await call.write(submit(submit_request("q0", PROMPTS[0], max_tokens=lengths[0],
                                                   ignore_eos=True)))
            await reader.read_until(lambda: "q0" in reader.tokens)
            # Hold the worker's steps (q0's next one waits) so the queue stays as it is.
            lock = worker.servicer._lock
            lock.acquire()
            is_held = True
            try:
                for i in (1, 2):
                    await call.write(submit(submit_request(f"q{i}", PROMPTS[i],
                                                           max_tokens=lengths[i],
                                                           ignore_eos=True)))
                await wait_until(lambda: server.pool.queued()[0] == 2, 10.0, "two waiting")
                await call.write(submit(submit_request("over", [50, 51, 52], max_tokens=5)))
                # The same refusals over Submit, with the queue in the same state.
                refused = stub.Submit(submit_request("over-submit", [50, 51, 52], max_tokens=5))
                with pytest.raises(grpc.aio.AioRpcError) as by_submit:
                    await asyncio.wait_for(refused.read(), 10.0)
                retry = dict(await refused.trailing_metadata()).get(RETRY_AFTER_KEY)
                bad = submit_request("bad", [5] * 10, logprobs=4)
                await call.write(submit(bad))
                with pytest.raises(grpc.aio.AioRpcError) as bad_by_submit:
                    await asyncio.wait_for(collect(stub, submit_request(
                        "bad-submit", [5] * 10, logprobs=4)), 10.0)
                await reader.read_until(lambda: reader.ended(["over", "bad"]))
                lock.release()
                is_held = False
                await reader.read_until(lambda: reader.ended(["q0", "q1", "q2"]))
                call.cancel()
            finally:
                if is_held:  # a failure above: let the worker (and the test) end
                    lock.release()
            return undisturbed, reader, by_submit.value, retry, bad_by_submit.value

    undisturbed, reader, by_submit, retry, bad_by_submit = run(main())
    over, bad = reader.errors["over"], reader.errors["bad"]
    assert by_submit.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert over.code == "RESOURCE_EXHAUSTED"
    assert over.message == by_submit.details() and "max_num_queued_reqs=2" in over.message
    assert over.HasField("retry_after_ms") and over.retry_after_ms == int(retry) > 0
    assert bad_by_submit.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.code == "INVALID_ARGUMENT" and not bad.HasField("retry_after_ms")
    assert bad.message == bad_by_submit.details() and bad.message.startswith("logprobs")
    assert set(reader.errors) == {"over", "bad"}
    for i, want in enumerate(undisturbed):
        assert reader.tokens[f"q{i}"] == want
        assert reader.finish[f"q{i}"] == generate_pb2.FINISH_REASON_LENGTH


def test_a_bad_session_request_gets_an_error_naming_the_field_and_the_session_stays_up(
        model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            want, _ = await collect(stub, submit_request("ref", PROMPTS[0], max_tokens=30,
                                                         ignore_eos=True))
            async with grpc.aio.insecure_channel(server.address) as channel:
                # Raw bytes up, so a message with a field this scheduler does not know fits.
                call = channel.stream_stream(
                    "/gridllm.v1.Scheduler/Session", request_serializer=lambda b: b,
                    response_deserializer=scheduler_pb2.SessionResponse.FromString)()
                good = submit_request("a", PROMPTS[0], max_tokens=30, ignore_eos=True)
                await call.write(submit(good).SerializeToString())
                empty_id = submit_request("", PROMPTS[1], max_tokens=3)
                await call.write(submit(empty_id).SerializeToString())
                await call.write(submit(good).SerializeToString())  # "a" again
                await call.write(b"\x38\x01")  # field 7: an unknown kind
                await call.write(scheduler_pb2.SessionRequest(
                    submit=scheduler_pb2.SessionSubmit(tenant="t")).SerializeToString())
                reader = SessionReader(call)
                errors: list[scheduler_pb2.SessionError] = []
                while len(errors) < 4:
                    message = await call.read()
                    errors.extend(message.errors)
                    for update in message.updates:
                        reader.tokens.setdefault(update.request_id, []).extend(update.token_ids)
                        if update.finish_reason:
                            reader.finish[update.request_id] = update.finish_reason
                await reader.read_until(lambda: "a" in reader.finish)
                # Still up: another request runs on it.
                await call.write(submit(submit_request("b", PROMPTS[0], max_tokens=30,
                                                       ignore_eos=True)).SerializeToString())
                await reader.read_until(lambda: "b" in reader.finish)
                call.cancel()
            return want, errors, reader

    want, errors, reader = run(main())
    assert [e.code for e in errors] == ["INVALID_ARGUMENT"] * 4
    messages = [e.message for e in errors]
    assert messages[0].startswith("request_id must not be empty")
    assert errors[1].request_id == "a" and "request_id 'a' is already in use" in messages[1]
    assert messages[2].startswith("kind must be set")
    assert messages[3].startswith("submit.request must be set")
    # The first "a" was not disturbed by its duplicate.
    assert reader.tokens["a"] == want and reader.tokens["b"] == want


def test_breaking_a_session_aborts_its_requests_and_frees_every_block(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            call = stub.Session()
            for i, p in enumerate(PROMPTS[:4]):
                await call.write(submit(submit_request(f"c{i}", p, max_tokens=200,
                                                       ignore_eos=True)))
            reader = SessionReader(call)
            await reader.read_until(lambda: len(reader.tokens) == 4)
            busy = await stub.GetStats(generate_pb2.GetServerStatsRequest())
            call.cancel()
            freed = await blocks_freed(stub, 200)
            return busy, freed, len(server.servicer.sessions), len(server.servicer.streams)

    busy, freed, num_sessions, num_streams = run(main())
    assert not all_blocks_free(busy)
    assert freed and num_sessions == 0 and num_streams == 0


_HOLDER = """
import asyncio, sys
import grpc
from gridllm.v1 import generate_pb2, scheduler_pb2, scheduler_pb2_grpc

async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).Session()
        for i in range(4):
            request = scheduler_pb2.SubmitRequest(
                request_id=f"k{i}", prompt_token_ids=[40 + i, 41, 42],
                sampling_params=generate_pb2.SamplingParams(max_tokens=200, ignore_eos=True))
            await call.write(scheduler_pb2.SessionRequest(
                submit=scheduler_pb2.SessionSubmit(request=request)))
        await call.read()
        print("streaming", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_session_client_gets_its_blocks_freed(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            holder = subprocess.Popen([sys.executable, "-c", _HOLDER, server.address],
                                      cwd=ROOT, stdout=subprocess.PIPE, text=True)
            try:
                line = await asyncio.wait_for(
                    asyncio.to_thread(holder.stdout.readline), 60.0)
                busy = await stub.GetStats(generate_pb2.GetServerStatsRequest())
                holder.send_signal(signal.SIGKILL)
                holder.wait(10)
                freed = await blocks_freed(stub, 300)
            finally:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait(10)
                holder.stdout.close()
            return line, busy, freed, len(server.servicer.sessions)

    line, busy, freed, num_sessions = run(main(), timeout=120)
    assert line.strip() == "streaming"
    assert not all_blocks_free(busy)
    assert freed and num_sessions == 0


def test_only_the_submitting_tenant_aborts_a_session_request(model_path):
    from gridllm.common.auth import TENANT_KEY

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            call = stub.Session()
            for name in ("kept", "mine", "quiet"):
                await call.write(submit(submit_request(name, PROMPTS[0], max_tokens=60,
                                                       ignore_eos=True), tenant="alice"))
            reader = SessionReader(call)
            await reader.read_until(lambda: len(reader.tokens) == 3)
            # Another tenant's aborts, over the session and over Abort, touch nothing.
            await call.write(scheduler_pb2.SessionRequest(abort=scheduler_pb2.SessionAbort(
                request_ids=["kept", "mine", "quiet"], tenant="bob")))
            refused = await stub.Abort(scheduler_pb2.AbortRequest(
                request_ids=["kept", "mine", "quiet"]), metadata=((TENANT_KEY, "bob"),))
            accepted = await stub.Abort(scheduler_pb2.AbortRequest(request_ids=["mine"]),
                                        metadata=((TENANT_KEY, "alice"),))
            await call.write(scheduler_pb2.SessionRequest(abort=scheduler_pb2.SessionAbort(
                request_ids=["quiet"], tenant="alice")))
            await reader.read_until(lambda: reader.ended(["kept", "mine"]))
            await wait_until(lambda: "quiet" not in server.servicer.streams, 10.0, "aborted")
            call.cancel()
            return reader, refused, accepted

    reader, refused, accepted = run(main())
    assert list(refused.aborted_request_ids) == []
    assert list(accepted.aborted_request_ids) == ["mine"]
    assert reader.finish["mine"] == generate_pb2.FINISH_REASON_ABORT
    assert reader.finish["kept"] == generate_pb2.FINISH_REASON_LENGTH
    assert len(reader.tokens["kept"]) == 60
    # Aborted over its own session: nothing more is sent for it.
    assert "quiet" not in reader.finish and "quiet" not in reader.errors
