"""The router's requests at one scheduler share one Session stream: far fewer messages than
a Submit call per request, the same tokens (greedy), and a request cancelled by its client
frees its blocks. A real router, scheduler and worker (tiny random model) on loopback."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gridllm.client import AsyncClient
from gridllm.common.grpc_utils import ServiceServer
from gridllm.common.request_ids import unscoped
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, generate_pb2_grpc
from router.routing import SchedulerPool
from router.server import SERVICE_NAME, GenerationServicer, RouterOptions
from tests.scheduler_svc.harness import run, running_scheduler, running_worker, wait_until
from tests.worker_svc.tiny_models import make_tiny_model

NUM_REQUESTS = 8
MAX_TOKENS = 24
PROMPTS = [[40 + i, 41 + i, 42, 43, 44 + i] for i in range(NUM_REQUESTS)]
MESSAGES = "gridllm:scheduler_stream_messages_total"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@contextlib.asynccontextmanager
async def router_to(scheduler_address: str, scheduler_stream: str):
    """A router (token-id prompts only) in front of one scheduler; yields its address and
    scheduler pool."""
    pool = SchedulerPool([scheduler_address], poll_interval_s=0.05)
    pool.start()
    router = ServiceServer([SERVICE_NAME])
    servicer = GenerationServicer(None, [], pool, RouterOptions(
        "m", scheduler_wait_s=10.0, scheduler_stream=scheduler_stream))
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, router.server)
    port = await router.start("127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}", pool
    finally:
        await router.stop(0)
        servicer.close()
        await pool.close()


@contextlib.asynccontextmanager
async def session_stack(model_path: str):
    """A worker, a scheduler and a router talking to it over a Session stream, all up;
    yields the scheduler's server, its stub and a client of the router."""
    async with running_worker(model_path) as worker, \
            running_scheduler([worker.address]) as (server, stub):
        await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
        async with router_to(server.address, "session") as (address, pool), \
                AsyncClient(address, timeout=60.0) as client:
            await wait_until(lambda: pool.alive(), 10.0, "scheduler alive")
            yield server, stub, client


async def generate(client: AsyncClient, prompt: list[int], max_tokens: int = MAX_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens, finish = [], None
    async for chunk in client.generate_stream(None, params, prompt_token_ids=prompt,
                                              return_token_ids=True):
        tokens += chunk.token_ids
        finish = chunk.finish_reason or finish
    return tokens, finish


def test_one_session_per_scheduler_carries_every_request_with_submits_tokens(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, _):
            await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
            registry = server.metrics.registry
            results = {}
            for mode in ("submit", "session"):
                before = registry.get_sample_value(MESSAGES, {"rpc": mode.capitalize()})
                async with router_to(server.address, mode) as (address, pool), \
                        AsyncClient(address, timeout=60.0) as client:
                    await wait_until(lambda p=pool: p.alive(), 10.0, "scheduler alive")
                    work = asyncio.gather(*(generate(client, p) for p in PROMPTS))
                    max_sessions = 0
                    while not work.done():
                        max_sessions = max(max_sessions, len(server.servicer.sessions))
                        await asyncio.sleep(0.01)
                    outputs = await work
                    link = pool.links[0]
                    router_messages = link.session.num_messages if link.session else 0
                after = registry.get_sample_value(MESSAGES, {"rpc": mode.capitalize()})
                results[mode] = (outputs, after - before, max_sessions, router_messages)
            return results

    results = run(main())
    submit_outputs, submit_messages, submit_sessions, _ = results["submit"]
    outputs, messages, num_sessions, router_messages = results["session"]
    assert submit_sessions == 0 and num_sessions == 1
    for (tokens, finish), (want, want_finish) in zip(outputs, submit_outputs, strict=True):
        assert len(want) == MAX_TOKENS and want_finish == "length"
        assert (tokens, finish) == (want, want_finish)
    # What the scheduler wrote is what the router read, one message per step at most for all
    # eight requests, where Submit wrote one per request per step.
    assert router_messages == messages
    assert submit_messages >= NUM_REQUESTS * MAX_TOKENS * 0.5
    assert messages * 4 <= submit_messages


def test_a_cancelled_request_is_aborted_over_the_session_and_others_go_on(model_path):
    async def main():
        async with session_stack(model_path) as (server, stub, client):
            want = await generate(client, PROMPTS[0])
            params = SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True)
            stream = client.generate_stream(None, params, prompt_token_ids=PROMPTS[1],
                                            request_id="long", return_token_ids=True)
            await stream.__anext__()

            def long_entries() -> list:
                return [entry for session in server.servicer.sessions
                        for req_id, entry in session.requests.items()
                        if unscoped(req_id).startswith("long")]

            def is_long_running() -> bool:
                return bool(long_entries())

            await wait_until(is_long_running, 10.0, "long submitted")
            (long_entry,) = long_entries()
            kept = asyncio.ensure_future(generate(client, PROMPTS[0]))
            await stream.aclose()  # cancels the Generate call
            await wait_until(lambda: not is_long_running(), 10.0, "aborted")
            # Aborted, not finished: far fewer than its 240 tokens were sent.
            num_made = long_entry.num_output_tokens
            got = await kept
            await wait_until(lambda: not server.servicer.streams, 10.0, "all done")
            stats = await stub.GetStats(generate_pb2.GetServerStatsRequest())
            num_sessions = len(server.servicer.sessions)
        return want, got, num_made, stats, num_sessions

    want, got, num_made, stats, num_sessions = run(main())
    assert 0 < num_made < 240
    assert got == want
    (worker,) = stats.workers
    assert worker.kv_blocks_free == worker.kv_blocks_total
    # The session outlives its requests: one stream, reused.
    assert num_sessions == 1


def test_scheduler_stream_must_name_a_path():
    from router.engine_client import EngineClient

    with pytest.raises(ValueError, match="scheduler_stream"):
        RouterOptions("m", scheduler_stream="bidi")
    with pytest.raises(ValueError, match="scheduler_stream"):
        EngineClient(None, [], None, scheduler_stream="bidi")  # type: ignore[arg-type]


def test_the_scheduler_span_joins_the_router_trace_through_the_session(model_path,
                                                                         monkeypatch):
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from gridllm.common import tracing

    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))

    async def main():
        async with session_stack(model_path) as (server, _, client):
            await generate(client, PROMPTS[0], 4)
            await wait_until(lambda: len(exporter.get_finished_spans()) >= 2, 10.0,
                             "both spans ended")
            return len(server.servicer.sessions)

    num_sessions = run(main())
    assert num_sessions == 1
    spans = {span.name: span for span in exporter.get_finished_spans()}
    router, scheduler = spans["router.generate"], spans["scheduler.submit"]
    assert scheduler.context.trace_id == router.context.trace_id
    assert scheduler.parent.span_id == router.context.span_id


class _Forgets:
    """What a SessionCall tells its session: finished or aborted request ids."""

    def __init__(self):
        self.forgotten: list[str] = []

    def forget(self, req_id: str) -> None:
        self.forgotten.append(req_id)

    def abort(self, req_id: str, tenant: str) -> None:  # pragma: no cover - not reached
        raise AssertionError("not aborted")


def test_updates_queued_while_the_reader_was_busy_come_out_merged():
    """Three steps' updates waiting in a request's queue come out as one update (tokens in
    order, the latest scalars); a finished update ends the merging and the call; an error
    queued behind updates comes after them, unmerged."""
    import grpc

    from gridllm.v1 import scheduler_pb2
    from router.scheduler_session import SessionCall, rpc_error

    async def main():
        session = _Forgets()
        queue: asyncio.Queue = asyncio.Queue()
        call = SessionCall(session, "r", "", queue, None)  # type: ignore[arg-type]
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[1],
                                                      num_cached_tokens=16, worker_id="w0"))
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[2, 3]))
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[4],
                                                      worker_id="w1"))
        first = await call.__anext__()
        assert list(first.token_ids) == [1, 2, 3, 4]
        assert first.num_cached_tokens == 16 and first.worker_id == "w1"
        assert not first.finish_reason
        # Nothing queued: the next update is awaited, then merged with what came meanwhile.
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[5]))
        queue.put_nowait(scheduler_pb2.SubmitResponse(
            request_id="r", token_ids=[6], finish_reason=generate_pb2.FINISH_REASON_STOP,
            stop_token_id=6))
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[99]))
        last = await call.__anext__()
        assert list(last.token_ids) == [5, 6] and last.finish_reason and last.stop_token_id == 6
        assert session.forgotten == ["r"]
        with pytest.raises(StopAsyncIteration):
            await call.__anext__()

        queue = asyncio.Queue()
        call = SessionCall(_Forgets(), "q", "", queue, None)  # type: ignore[arg-type]
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="q", token_ids=[7]))
        queue.put_nowait(scheduler_pb2.SubmitResponse(request_id="q", token_ids=[8]))
        queue.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE, "scheduler gone"))
        assert list((await call.__anext__()).token_ids) == [7, 8]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.__anext__()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


class _Aborts(_Forgets):
    """Records aborts too."""

    def __init__(self):
        super().__init__()
        self.aborted: list[str] = []

    def abort(self, req_id: str, tenant: str) -> None:
        self.aborted.append(req_id)


def test_a_deadline_ends_the_read_and_the_request_is_still_aborted_upstream():
    """The deadline's DEADLINE_EXCEEDED comes after the updates already queued (merged into
    one), and, unlike an error from upstream, leaves the request to be aborted there."""
    import time

    import grpc

    from gridllm.v1 import scheduler_pb2
    from router.scheduler_session import Inbox, SessionCall

    async def main():
        session = _Aborts()
        inbox = Inbox()
        call = SessionCall(session, "r", "", inbox, time.monotonic() + 0.05)  # type: ignore[arg-type]
        inbox.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[1]))
        assert list((await call.__anext__()).token_ids) == [1]
        inbox.put_nowait(scheduler_pb2.SubmitResponse(request_id="r", token_ids=[2]))
        await asyncio.sleep(0.1)  # the deadline passes with an update queued before it
        assert list((await call.__anext__()).token_ids) == [2]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.__anext__()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call.cancel()
        assert session.aborted == ["r"] and session.forgotten == []
        with pytest.raises(StopAsyncIteration):
            await call.__anext__()

        # An error from upstream ends the call: nothing is aborted; a finished call's timer
        # is gone.
        session = _Aborts()
        inbox = Inbox()
        call = SessionCall(session, "s", "", inbox, time.monotonic() + 60)  # type: ignore[arg-type]
        inbox.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE, "scheduler gone"))
        with pytest.raises(grpc.aio.AioRpcError):
            await call.__anext__()
        call.cancel()
        assert session.aborted == [] and call._timer is None

    from router.scheduler_session import rpc_error

    asyncio.run(main())
