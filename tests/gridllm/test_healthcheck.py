"""``python -m gridllm.healthcheck``: exit 0 on SERVING, 1 otherwise, against the services'
own server plumbing (ServiceServer) on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from gridllm import healthcheck
from gridllm.common.grpc_utils import ServiceServer, free_port

_SERVICE = "gridllm.v1.Test"


def test_exit_code_follows_the_serving_status(capsys):
    async def scenario():
        server = ServiceServer([_SERVICE])
        port = await server.start("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        loop = asyncio.get_running_loop()

        async def probe(*args: str) -> int:
            return await loop.run_in_executor(None, healthcheck.main, [target, *args])

        try:
            codes = {"starting": await probe(),
                     "starting, service": await probe("--service", _SERVICE)}
            await server.set_serving(True)
            codes["serving"] = await probe()
            codes["serving, service"] = await probe("--service", _SERVICE)
            codes["unknown service"] = await probe("--service", "gridllm.v1.Nope")
            # The module as the container runs it, in a process of its own.
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; from gridllm import healthcheck; "
                "code = healthcheck.main(sys.argv[1:]); "
                "assert 'torch' not in sys.modules; sys.exit(code)", target,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(child.communicate(), 60)
            codes["subprocess"] = child.returncode
            await server.set_serving(False)
            codes["draining"] = await probe()
            return codes, out.decode() + err.decode()
        finally:
            await server.stop(0)

    codes, child_output = asyncio.run(scenario())
    assert codes == {"starting": 1, "starting, service": 1, "serving": 0,
                     "serving, service": 0, "unknown service": 1, "subprocess": 0,
                     "draining": 1}, child_output
    assert "SERVING" in child_output
    printed = capsys.readouterr().out
    assert "NOT_SERVING" in printed and "NOT_FOUND" in printed


def test_unreachable_server_fails_within_the_timeout(capsys):
    start = time.monotonic()
    assert healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1
    assert time.monotonic() - start < 5
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["localhost"], "target"), (["localhost:0"], "target"), (["localhost:http"], "target"),
    ([":50051"], "target"), (["localhost:50051", "--timeout", "0"], "--timeout")])
def test_bad_arguments_name_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        healthcheck.main(argv)
    assert exit_info.value.code == 2
    assert f"error: {field}:" in capsys.readouterr().err
