"""`gridllm bench serve --sweep`: the numbers are written whatever happens to the plot, and
the exit status says when the plot could not be made (before the sweep when matplotlib is
missing, after it when drawing fails)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import grpc
import pytest

from gridllm.bench import main as bench_main
from gridllm.v1 import generate_pb2, generate_pb2_grpc


class _CountingRouter(generate_pb2_grpc.GenerationServicer):
    """Streams one token per response (a stand-in router that counts the requests)."""

    def __init__(self) -> None:
        self.num_requests = 0

    async def Generate(self, request, context):
        self.num_requests += 1
        max_tokens = request.sampling_params.max_tokens
        for i in range(max_tokens):
            last = i == max_tokens - 1
            yield generate_pb2.GenerateResponse(
                request_id="r", token_ids=[i],
                finish_reason=generate_pb2.FINISH_REASON_LENGTH if last else 0)

    async def GetModelInfo(self, request, context):
        return generate_pb2.GetModelInfoResponse(model="counting", max_model_len=256,
                                                 vocab_size=100, eos_token_id=2, block_size=16)


@pytest.fixture
def router():
    servicer = _CountingRouter()
    ready = threading.Event()
    state: dict = {}

    def serve() -> None:
        async def run() -> None:
            server = grpc.aio.server()
            generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
            state["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            state["stop"], state["loop"] = asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await state["stop"].wait()
            await server.stop(0)

        asyncio.run(run())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield f"127.0.0.1:{state['port']}", servicer
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


def _sweep(target: str, *extra: str) -> int:
    return bench_main(["serve", "--target", target, "--sweep", "50,inf", "--num-prompts", "3",
                       "--input-len-range", "2:4", "--output-len-range", "2:3", "--no-tqdm",
                       *extra])


def test_sweep_exits_nonzero_when_the_plot_cannot_be_written(router, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target, servicer = router
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the plot's folder should be")
    output = tmp_path / "sweep.json"
    assert _sweep(target, "--output", str(output), "--plot", str(blocker / "p.png")) == 1
    # The numbers were still written and printed.
    result = json.loads(output.read_text())
    assert [run["num_completed"] for run in result["runs"]] == [3, 3]
    assert "plot" not in result
    assert "model counting" in capsys.readouterr().out
    assert servicer.num_requests == 6


def test_sweep_plots_and_exits_zero(router, tmp_path):
    pytest.importorskip("matplotlib")
    target, _ = router
    output = tmp_path / "sweep.json"
    assert _sweep(target, "--output", str(output)) == 0
    assert json.loads(output.read_text())["plot"] == str(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_matplotlib_fails_before_sending_anything(router, tmp_path, monkeypatch,
                                                                caplog):
    target, servicer = router
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert _sweep(target, "--output", str(tmp_path / "sweep.json")) == 2
    assert "pip install 'gridllm[plot]'" in caplog.text
    assert servicer.num_requests == 0
    assert not (tmp_path / "sweep.json").exists()
