"""The router's request path per streamed token, without gRPC: CPU microseconds per token.

256 requests (by default) go through ``EngineClient.generate`` and ``generate_response`` as
the gRPC front runs them; a stand-in session feeds each step's updates from one parsed
``SessionResponse`` (as the session reader does) into the requests' inboxes. What it leaves
out is gRPC's own work per message, on both the session and the client streams; what it
times is the Python the router runs per token (inbox, update conversion, completion state,
metrics, response building). Prints CPU us per token.

Usage: ``python benchmarks/router_path.py [--requests 256] [--steps 1000] [--gc-threshold N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.common.sampling_params import SamplingParams  # noqa: E402
from gridllm.v1 import generate_pb2, scheduler_pb2  # noqa: E402
from router.engine_client import EngineClient  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.responses import generate_response  # noqa: E402
from router.scheduler_session import Inbox, SessionCall  # noqa: E402
from router.validation import ValidatedRequest  # noqa: E402


class _Session:
    """The inboxes a SchedulerSession keeps, without its stream."""

    def __init__(self) -> None:
        self.inboxes: dict[str, Inbox] = {}

    def submit(self, submit: scheduler_pb2.SessionSubmit, deadline: float | None = None
               ) -> SessionCall:
        req_id = submit.request.request_id
        inbox = self.inboxes[req_id] = Inbox()
        return SessionCall(self, req_id, "", inbox, deadline)  # type: ignore[arg-type]

    def forget(self, req_id: str) -> None:
        self.inboxes.pop(req_id, None)

    def abort(self, req_id: str, tenant: str) -> None:
        self.inboxes.pop(req_id, None)


class _Link:
    supports_session = True
    num_inflight = 0
    address = "stand-in"
    info = None

    def __init__(self, session: _Session):
        self.session = session

    def open_session(self) -> _Session:
        return self.session

    def prefilled(self) -> None:
        pass


class _Pool:
    def __init__(self, link: _Link):
        self.link = link

    async def pick(self, token_ids, wait_s, cache_salt=None) -> _Link:
        return self.link

    def note_computed(self, *args) -> None:
        pass


async def run(num_requests: int, num_steps: int) -> tuple[int, float]:
    """(messages built, CPU seconds) for ``num_steps`` steps of ``num_requests`` requests."""
    session = _Session()
    engine = EngineClient(None, [2], _Pool(_Link(session)), metrics=RouterMetrics())  # type: ignore[arg-type]
    num_messages = 0

    async def one(i: int) -> None:
        nonlocal num_messages
        validated = ValidatedRequest(f"r{i}", None, list(range(5, 37)),
                                     SamplingParams(max_tokens=num_steps, ignore_eos=True), 0,
                                     True)
        async for delta in engine.generate(validated, None, "grpc"):
            response = generate_response(validated.request_id, delta, True)
            if response is not None:
                num_messages += 1
                response.SerializeToString()
            await asyncio.sleep(0)  # stands for the awaited write to the client

    tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
    await asyncio.sleep(0.01)
    start = time.process_time()
    for step in range(num_steps):
        message = scheduler_pb2.SessionResponse()
        for req_id in list(session.inboxes):
            update = message.updates.add(request_id=req_id, token_ids=[100 + step % 50])
            if step == num_steps - 1:
                update.finish_reason = generate_pb2.FINISH_REASON_LENGTH
        message = scheduler_pb2.SessionResponse.FromString(message.SerializeToString())
        for update in message.updates:
            inbox = session.inboxes.get(update.request_id)
            if inbox is not None:
                inbox.put_nowait(update)
        for _ in range(4):
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    engine.close()
    return num_messages, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--gc-threshold", type=int, default=None,
                        help="young-generation threshold (default: the services' own)")
    args = parser.parse_args()
    from gridllm.common.heap import GC_GEN0_THRESHOLD

    gc.collect()
    gc.freeze()
    threshold = args.gc_threshold or GC_GEN0_THRESHOLD
    gc.set_threshold(threshold, *gc.get_threshold()[1:])
    messages, cpu_s = asyncio.run(run(args.requests, args.steps))
    print(f"{args.requests} requests x {args.steps} steps, gc threshold {threshold}: "
          f"{messages} messages, {cpu_s * 1e6 / messages:.2f} CPU us per token")


if __name__ == "__main__":
    main()
