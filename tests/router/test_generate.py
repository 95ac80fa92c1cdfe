"""The router's Generate path against LLM's output path, for the same scheduler updates.

A scheduler that replays fixed ``RequestUpdate``s (resuming from the tokens a resubmission
carries) serves a real router over loopback gRPC; a real client collects the stream. The same
updates go through ``OutputProcessor``, the path of ``LLM.generate``; both must agree.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from gridllm.client import AsyncClient
from gridllm.common.contract import FinishReason, RequestUpdate, TokenLogprobs
from gridllm.common.convert import request_update_to_pb, sampling_params_from_pb
from gridllm.common.grpc_utils import ServiceServer
from gridllm.common.output_processor import OutputProcessor
from gridllm.common.request_ids import unscoped
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, generate_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from router.routing import SchedulerPool
from router.server import SERVICE_NAME, GenerationServicer, RouterOptions

TEXTS = ["The quick brown fox jumps over the lazy dog. café naïve",
         "Hello world, hello gridllm! 日本語 🙂 done",
         "déjà vu — multi-byte characters span several byte tokens."]


class ReplayScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams ``scripts[request_id]``, skipping the tokens a resubmission already carries.

    Args:
        scripts: updates per request id (the router's child ids).
        num_messages_before_failure: the first Submit of each id dies (UNAVAILABLE) after
            this many messages; None: never.
    """

    def __init__(self, scripts: dict[str, list[RequestUpdate]],
                 num_messages_before_failure: int | None = None):
        self.scripts = scripts
        self.num_messages_before_failure = num_messages_before_failure
        self.submits: list[scheduler_pb2.SubmitRequest] = []
        self.cancelled_ids: list[str] = []

    async def Submit(self, request, context):
        # Recorded under the client's child ids: the router scopes each request's ids.
        request.request_id = unscoped(request.request_id)
        self.submits.append(request)
        req_id = request.request_id.split("~")[0]
        is_first = sum(s.request_id.split("~")[0] == req_id for s in self.submits) == 1
        updates, num_skipped = list(self.scripts[req_id]), 0
        while num_skipped < len(request.output_token_ids):
            num_skipped += len(updates.pop(0).new_token_ids)
        assert num_skipped == len(request.output_token_ids)
        try:
            for k, update in enumerate(updates):
                if is_first and k == self.num_messages_before_failure:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler died")
                yield request_update_to_pb(dataclasses.replace(update,
                                                               req_id=request.request_id))
                await asyncio.sleep(0.01)
            if not updates[-1].finished:
                # Runs on (ignore_eos, no max_tokens yet): only the router's cancel ends it.
                await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled_ids.append(request.request_id)
            raise

    async def GetInfo(self, request, context):
        return scheduler_pb2.SchedulerInfo(scheduler_id="replay", model="m", max_model_len=4096,
                                           vocab_size=320, block_size=16, num_workers=1,
                                           eos_token_id=1)

    async def GetStats(self, request, context):
        return generate_pb2.GetServerStatsResponse()


def script(req_id: str, token_ids: list[int], size: int, finish: FinishReason | None,
           logprobs: bool) -> list[RequestUpdate]:
    updates = [RequestUpdate(req_id, token_ids[k:k + size], num_cached_tokens=16)
               for k in range(0, len(token_ids), size)]
    if logprobs:
        for update in updates:
            # The chosen token, then a top-2 that repeats it (as the sampler sends).
            update.new_logprobs = [TokenLogprobs([t, t, 3], [-0.5, -0.5, -1.5], [1, 1, 2])
                                   for t in update.new_token_ids]
    updates[-1].finish_reason = finish
    return updates


def serve_and_generate(tok, scheduler: ReplayScheduler, prompt_ids: list[int],
                       params: SamplingParams, return_token_ids: bool):
    async def main():
        upstream = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, upstream)
        upstream_port = upstream.add_insecure_port("127.0.0.1:0")
        await upstream.start()
        pool = SchedulerPool([f"127.0.0.1:{upstream_port}"], poll_interval_s=0.05)
        pool.start()
        router = ServiceServer([SERVICE_NAME])
        generate_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(tok, [1], pool, RouterOptions("m", scheduler_wait_s=10.0)),
            router.server)
        port = await router.start("127.0.0.1:0")
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=30.0) as client:
                chunks = [c async for c in client.generate_stream(
                    None, params, prompt_token_ids=prompt_ids, request_id="req",
                    return_token_ids=return_token_ids)]
            await asyncio.sleep(0.1)  # lets the upstream see a cancel
            return chunks
        finally:
            await router.stop(0)
            await pool.close()
            await upstream.stop(0)

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


def llm_path(tok, scripts, prompt_ids: list[int], params: SamplingParams):
    processor = OutputProcessor(tok)
    processor.add("req", None, prompt_ids, params)
    stopped, finished = [], []
    pending = {req_id: list(updates) for req_id, updates in scripts.items()}
    while pending:
        for req_id in list(pending):
            done, ids_to_abort = processor.process([pending[req_id].pop(0)])
            finished += done
            stopped += ids_to_abort
            if req_id in ids_to_abort or not pending[req_id]:
                del pending[req_id]
    (output,) = finished
    return output, stopped


def positions(logprobs) -> list[list[tuple]]:
    return [[(t, round(lp.logprob, 4), lp.rank, lp.decoded_token) for t, lp in p.items()]
            for p in logprobs or []]


CASES = {
    # Multi-byte characters one byte token at a time, logprobs without token ids in the stream.
    "bytes-logprobs": dict(n=1, size=1, stop=None, logprobs=1, return_token_ids=False),
    "chunks": dict(n=1, size=3, stop=None, logprobs=None, return_token_ids=True),
    "stop": dict(n=1, size=1, stop="fox jum", logprobs=None, return_token_ids=True),
    "stop-included": dict(n=1, size=2, stop="fox jum", logprobs=None, return_token_ids=True,
                          include_stop_str_in_output=True),
    "n3": dict(n=3, size=2, stop=None, logprobs=2, return_token_ids=True),
    "n3-stop": dict(n=3, size=1, stop="llm", logprobs=None, return_token_ids=True),
    "resubmit": dict(n=1, size=1, stop=None, logprobs=None, return_token_ids=True, fail=4),
    "resubmit-n2": dict(n=2, size=2, stop=None, logprobs=1, return_token_ids=True, fail=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_router_stream_equals_llm_output_for_the_same_updates(tiny_tokenizer, case):
    tok = tiny_tokenizer
    spec = dict(CASES[case])
    fail = spec.pop("fail", None)
    size, stop, return_token_ids = spec.pop("size"), spec.pop("stop"), spec.pop("return_token_ids")
    params = SamplingParams(max_tokens=200, seed=5, stop=[stop] if stop else None, **spec)
    prompt_ids = tok.encode("Once upon a time")
    child_ids = ["req"] if params.n == 1 else [f"req-{k}" for k in range(params.n)]
    # A completion with the stop string in it never finishes upstream.
    scripts = {req_id: script(req_id, tok.encode(TEXTS[k]), size,
                              None if stop and stop in TEXTS[k] else FinishReason.LENGTH,
                              params.logprobs is not None)
               for k, req_id in enumerate(child_ids)}
    scheduler = ReplayScheduler(scripts, fail)
    chunks = serve_and_generate(tok, scheduler, prompt_ids, params, return_token_ids)
    expected, stopped = llm_path(tok, scripts, prompt_ids, params)

    assert sorted({c.index for c in chunks}) == list(range(params.n))
    for completion in expected.outputs:
        mine = [c for c in chunks if c.index == completion.index]
        assert "".join(c.text for c in mine) == completion.text, completion.index
        assert "\ufffd" not in "".join(c.text for c in mine)
        assert all(c.finish_reason is None for c in mine[:-1])
        final = mine[-1]
        assert (final.finish_reason, final.stop_reason) == (completion.finish_reason,
                                                            completion.stop_reason)
        assert final.usage.prompt_tokens == len(prompt_ids)
        assert final.usage.completion_tokens == len(completion.token_ids)
        assert final.usage.cached_tokens == 16
        if return_token_ids:
            assert [t for c in mine for t in c.token_ids] == completion.token_ids
        if params.logprobs is not None:
            streamed = [p for c in mine for p in c.logprobs]
            assert len(streamed) == len(completion.token_ids)
            assert positions(streamed) == positions(completion.logprobs)
    # The same children, named and seeded once for both paths.
    first_submits = [s for s in scheduler.submits if "~" not in s.request_id]
    assert sorted(s.request_id for s in first_submits) == child_ids
    assert sorted(sampling_params_from_pb(s.sampling_params).seed for s in first_submits) == [
        5 + k for k in range(params.n)]
    # A stop string found downstream ends the request upstream too.
    assert sorted(scheduler.cancelled_ids) == sorted(stopped)
    if stop:
        assert stopped == [r for k, r in enumerate(child_ids) if stop in TEXTS[k]]
    if fail is not None:
        resubmits = [s for s in scheduler.submits if "~" in s.request_id]
        assert len(resubmits) == params.n
        assert all(len(s.output_token_ids) == fail * size for s in resubmits)
