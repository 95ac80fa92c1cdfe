"""End to end with tensor-parallel workers: client -> router -> scheduler -> two workers of
two ranks each (gloo, CPU), started by the launcher as ``gridllm up --tensor-parallel-size 2``.

Greedy streams equal the single-device LLM and transformers; a rank killed with SIGKILL
takes its whole worker down (it names the lost rank in its log and exits 75), and the
scheduler moves the worker's requests to the other worker (they finish with the ids an
undisturbed run gives) or, with no worker left, fails them with UNAVAILABLE; the supervisor
of ``gridllm up`` then starts both workers again, each with its two ranks, and they serve
the same ids; stopping the stack drains them, ranks included, with a clean exit. The tests
share one stack and run in file order.
"""

from __future__ import annotations

import os
import re
import signal
import threading

import grpc
import pytest

from gridllm.client import Client
from gridllm.common.config import ModelConfig
from gridllm.common.procs import EXITED_STATES, stat_fields
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack
from router.server import RouterOptions
from tests.e2e.conftest import SERVED_MODEL_NAME, stack_config
from tests.e2e.test_stack import GREEDY, PROMPTS, stream_text, wait_until
from tests.worker_svc.hf_reference import hf_greedy

pytestmark = pytest.mark.slow

# Long enough that a kill lands mid-stream on this machine, short enough for a reference.
LONG = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
# A fixed length: the transformers reference does not stop at EOS.
FIXED = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
_RANK_PID = re.compile(r"tensor-parallel rank (\d+) of \d+: pid (\d+)")


@pytest.fixture(scope="module")
def stack(tiny_served_model, e2e_redis_url, tmp_path_factory):
    config = stack_config(
        tiny_served_model, e2e_redis_url, str(tmp_path_factory.mktemp("tp-stack-logs")),
        num_workers=2, model_config=ModelConfig(tiny_served_model, device="cpu",
                                                tensor_parallel_size=2),
        # The router waits this long for a scheduler with a live worker before it fails a
        # request whose worker was lost with no other left.
        router_options=RouterOptions(model=tiny_served_model,
                                     served_model_name=SERVED_MODEL_NAME, scheduler_wait_s=2.0))
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def llm(tiny_served_model):
    from gridllm.llm import LLM

    return LLM(tiny_served_model, device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.endpoint, timeout=60.0) as c:
        yield c


def follower_pid(worker) -> int:
    """Rank 1's pid, from the worker's log (rank 0 is the worker process itself); the
    latest one when the worker was restarted (its log is appended to)."""
    with open(worker.log_path) as log:
        pids = {int(rank): int(pid) for rank, pid in _RANK_PID.findall(log.read())}
    return pids[1]


def read_log(process) -> str:
    with open(process.log_path) as log:
        return log.read()


def live_processes_of_group(pgid: int) -> list[int]:
    """Pids (not zombies) in process group ``pgid``: a worker and every process it forked."""
    pids = []
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] not in EXITED_STATES:
            pids.append(int(entry))
    return pids


def worker_address(worker) -> str:
    return worker.env["GRIDLLM_ADDRESS"]


def stream_in_thread(client: Client, prompt: str, params: SamplingParams, results: dict):
    def run():
        try:
            results[prompt] = stream_text(client, prompt, params)[2]
        except grpc.RpcError as exc:
            results[prompt] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_workers_run_two_ranks_and_stream_the_single_device_ids(stack, client, llm):
    for worker in stack.workers:
        assert "--tensor-parallel-size 2" in " ".join(worker.argv)
        assert os.path.exists(f"/proc/{follower_pid(worker)}")
    references = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, reference in zip(PROMPTS, references, strict=True):
        _, text, token_ids = stream_text(client, prompt, GREEDY)
        assert token_ids == reference.outputs[0].token_ids, prompt
        assert text == reference.outputs[0].text


def test_the_two_rank_workers_stream_the_ids_of_transformers(client, llm, tiny_served_model):
    for prompt, reference in zip(PROMPTS, llm.generate(PROMPTS, FIXED, use_tqdm=False),
                                 strict=True):
        expected, _ = hf_greedy(tiny_served_model, reference.prompt_token_ids,
                                FIXED.max_tokens)
        assert stream_text(client, prompt, FIXED)[2] == expected, prompt


def test_a_killed_rank_takes_its_worker_down_and_its_requests_migrate(stack, client, llm):
    wait_until(lambda: client.server_stats().num_workers_alive == 2, 20.0, "both workers")
    doomed, survivor = stack.workers
    prompts = [f"{i} {PROMPTS[i % len(PROMPTS)]}" for i in range(6)]
    expected = {p: o.outputs[0].token_ids
                for p, o in zip(prompts, llm.generate(prompts, LONG, use_tqdm=False),
                                strict=True)}
    results: dict = {}
    threads = [stream_in_thread(client, p, LONG, results) for p in prompts]

    def running_on_doomed() -> bool:
        stats = client.server_stats()
        return any(w.address == worker_address(doomed) and w.num_requests_running
                   for w in stats.workers)

    wait_until(running_on_doomed, 20.0, "requests running on the first worker", 0.02)
    killed = follower_pid(doomed)
    os.kill(killed, signal.SIGKILL)
    doomed.popen.wait(20.0)  # rank 0 exits once its monitor sees rank 1 gone
    assert doomed.popen.returncode == 75
    # The worker says which rank it lost and that it exits.
    assert re.search(rf"tensor-parallel rank 1 \(pid {killed}\) exited with code -9: the "
                     r"engine's ranks are stopped; worker \S+ exits", read_log(doomed))
    wait_until(lambda: not live_processes_of_group(doomed.pid), 10.0,
               "every process of the worker to exit")
    for thread in threads:
        thread.join(120.0)
    assert results == expected  # every stream finished, with the undisturbed run's ids
    assert re.search(r"worker \w+ lost with \d+ requests; resuming them elsewhere",
                     read_log(stack.scheduler))
    wait_until(lambda: client.server_stats().num_workers_alive == 1, 20.0, "worker gone")
    assert survivor.is_alive()


def test_with_no_worker_left_a_killed_rank_fails_its_requests_unavailable(stack, client):
    survivor = stack.workers[1]
    results: dict = {}
    thread = stream_in_thread(client, PROMPTS[0], LONG, results)
    wait_until(lambda: client.server_stats().num_requests_running == 1, 20.0,
               "the request to run", 0.02)
    os.kill(follower_pid(survivor), signal.SIGKILL)
    survivor.popen.wait(20.0)
    thread.join(60.0)
    error = results[PROMPTS[0]]
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert survivor.popen.returncode == 75
    wait_until(lambda: not live_processes_of_group(survivor.pid), 10.0,
               "every process of the worker to exit")


def test_the_supervisor_restarts_the_workers_with_their_ranks(stack, client, llm):
    dead_followers = {follower_pid(w) for w in stack.workers}
    stack.start_supervising(interval_s=0.1)
    wait_until(lambda: not dead_followers & {follower_pid(w) for w in stack.workers}, 120.0,
               "both workers restarted with new followers")
    wait_until(lambda: client.server_stats().num_workers_alive == 2, 120.0,
               "both restarted workers linked")
    for worker in stack.workers:
        assert worker.is_alive()
        assert os.path.exists(f"/proc/{follower_pid(worker)}")
    references = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, reference in zip(PROMPTS, references, strict=True):
        assert stream_text(client, prompt, GREEDY)[2] == reference.outputs[0].token_ids


def test_stopping_the_stack_drains_the_workers_and_their_ranks(stack):
    workers = list(stack.workers)
    stack.stop()
    # SIGTERM reaches the whole group; rank 0 alone drains, then stops its follower: a clean
    # exit within the grace period, not the launcher's SIGKILL.
    assert [w.popen.returncode for w in workers] == [0] * len(workers)
    for worker in workers:  # the followers (forked by its forkserver) share its group
        wait_until(lambda w=worker: not live_processes_of_group(w.pid), 10.0,
                   "every process of the worker to exit")
