"""gridllm.cli: `up` starts a real stack and stops all of it on SIGTERM; `generate` streams
from it; `run` generates in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gridllm.cli import build_parser, main
from gridllm.common.procs import is_running
from tests.e2e.tiny_model import build_tiny_served_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # Short context: the CLI commands size nothing beyond it.
    return build_tiny_served_model(tmp_path_factory.mktemp("cli-model"), max_model_len=256)


@pytest.fixture(scope="module")
def reference_text(model_dir) -> str:
    from gridllm.common.sampling_params import SamplingParams
    from gridllm.llm import LLM

    llm = LLM(model_dir, device="cpu", num_kv_blocks=32)
    return llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0].text


def test_parser_defaults():
    args = build_parser().parse_args(["up"])
    assert (args.model, args.num_workers, args.port, args.redis_url) == ("smollm2-135m", 1,
                                                                         50051, None)
    args = build_parser().parse_args(["generate", "hi"])
    assert args.target == "localhost:50051" and args.prompt == "hi"


def test_run_generates_in_process(model_dir, reference_text, capsys):
    assert main(["run", "--model", model_dir, "--device", "cpu", "--num-kv-blocks", "32",
                 "--max-tokens", "12", PROMPT]) == 0
    assert capsys.readouterr().out == reference_text + "\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "GRIDLLM_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_up_serves_generate_and_stops_everything_on_sigterm(model_dir, reference_text,
                                                            tmp_path):
    # Ctrl-C (SIGINT) goes through the same handler in cmd_up; one signal is tested.
    signum = signal.SIGTERM
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        # Its own session: SIGTERM goes to the launcher alone, not to a process group.
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gridllm.cli", "up", "--model", model_dir, "--workers", "1",
             "--port", "0", "--http-port", "0", "--num-kv-blocks", "32",
             "--log-dir", str(tmp_path / "logs"),
             "--startup-timeout", "120"],
            stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=str(tmp_path),
            start_new_session=True)
    try:
        line = launcher.stdout.readline().decode()
        endpoint = re.search(r" at (\S+:\d+) ", line)
        assert endpoint, (line, log_path.read_text())
        result = subprocess.run(
            [sys.executable, "-m", "gridllm.cli", "generate", "--target", endpoint.group(1),
             "--max-tokens", "12", "--timeout", "60", PROMPT],
            capture_output=True, env=_env(), timeout=120)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert result.stdout.decode() == reference_text + "\n"
        pids = {name: int(pid) for name, pid in
                re.findall(r"started (\S+) \(pid (\d+)\)", log_path.read_text())}
        assert set(pids) == {"redis", "scheduler", "worker-1", "router"}
        assert all(is_running(pid) for pid in pids.values())

        launcher.send_signal(signum)
        assert launcher.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(is_running(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, pid in pids.items() if is_running(pid)], "orphans left"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# ----------------------------------------------------------------------- flags
def test_version_prints_the_package_version(capsys):
    from gridllm import __version__

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gridllm {__version__}"


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


# Engine and service settings `gridllm up` must reach, with the default help shows.
UP_FLAGS = {
    "--max-num-seqs": "256", "--max-num-batched-tokens": "2048", "--dtype": "auto",
    "--gpu-memory-utilization": "0.9", "--scheduling-policy": "fcfs",
    "--max-model-len": "the model's", "--enable-prefix-caching": "True",
    "--enable-chunked-prefill": "True", "--block-size": "16", "--enforce-eager": "False",
    "--attention-backend": "auto", "--kv-cache-memory": "1GiB", "--num-kv-blocks": None,
    "--device": "auto", "--served-model-name": "--model", "--heartbeat-ttl": "6.0",
    "--max-steps-in-flight": "2", "--workers": "1", "--port": "50051",
}


def test_up_help_lists_every_engine_and_service_option_with_its_default(capsys):
    text = _help(["up"], capsys)
    listing = text[text.index("options:"):]  # past the usage line
    for flag, default in UP_FLAGS.items():
        entry = re.search(re.escape(flag) + r"[ ,].*?\(default: ([^)]*)\)", listing)
        assert entry, flag
        if default is not None:
            assert entry.group(1).startswith(default), (flag, entry.group(1))


def test_bench_help_lists_each_commands_flags(capsys):
    text = _help(["bench"], capsys)
    for command, flag in (("throughput", "--num-prompts"), ("serve", "--request-rate"),
                          ("latency", "--num-iters")):
        assert f"gridllm bench {command}" in text and flag in text


def test_run_and_up_take_sizes_with_units():
    args = build_parser().parse_args(["up", "--kv-cache-memory", "512MiB"])
    assert args.kv_cache_memory == 512 << 20
    args = build_parser().parse_args(["run", "--kv-cache-memory", "1.5GiB", "hi"])
    assert args.kv_cache_memory == 3 << 29


def test_up_flags_reach_the_services_it_starts():
    """Every non-default `gridllm up` flag ends up in the argv of the service it belongs to,
    where that service's own parser reads it back to the same value."""
    import router.__main__ as router_main
    import scheduler_svc.__main__ as scheduler_main
    import worker_svc.__main__ as worker_main
    from gridllm.cli import stack_config_from_args

    args = build_parser().parse_args([
        "up", "--model", "my-model", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--dtype", "float16", "--gpu-memory-utilization", "0.5", "--scheduling-policy",
        "priority", "--max-model-len", "300", "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill", "--block-size", "32", "--enforce-eager",
        "--attention-backend", "torch", "--kv-cache-memory", "2GiB", "--num-kv-blocks", "99",
        "--device", "cpu", "--seed", "5", "--heartbeat-ttl", "9", "--discovery-interval", "0.5",
        "--max-steps-in-flight", "1", "--scheduler-id", "s1", "--tokenizer", "tok",
        "--scheduler-wait", "7", "--max-resubmits", "1"])
    config = stack_config_from_args(args)
    scheduler = scheduler_main.parse_args(config.scheduler_args())
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens,
            scheduler.scheduling_policy, scheduler.enable_prefix_caching,
            scheduler.enable_chunked_prefill, scheduler.heartbeat_ttl,
            scheduler.discovery_interval, scheduler.max_steps_in_flight,
            scheduler.scheduler_id) == (8, 512, "priority", False, False, 9.0, 0.5, 1, "s1")
    worker = worker_main.parse_args(["--model", "path", *config.worker_args()])
    assert (worker.max_num_seqs, worker.max_num_batched_tokens, worker.dtype,
            worker.gpu_memory_utilization, worker.max_model_len, worker.block_size,
            worker.enforce_eager, worker.attention_backend, worker.kv_cache_memory,
            worker.num_kv_blocks, worker.device, worker.seed, worker.heartbeat_ttl) == (
        8, 512, "float16", 0.5, 300, 32, True, "torch", 2 << 30, 99, "cpu", 5, 9.0)
    router = router_main.parse_args(["--model", "path", "--scheduler", "h:1",
                                     *config.router_args()])
    assert (router.served_model_name, router.tokenizer, router.scheduler_wait_s,
            router.max_resubmits) == ("my-model", "tok", 7.0, 1)


def test_up_with_defaults_passes_only_the_served_name():
    from gridllm.cli import stack_config_from_args

    config = stack_config_from_args(build_parser().parse_args(["up"]))
    assert config.scheduler_args() == [] and config.worker_args() == []
    assert config.router_args() == ["--served-model-name", "smollm2-135m"]


def test_up_passes_api_keys_to_the_router_hashed_never_as_flags(tmp_path, monkeypatch):
    from gridllm.cli import stack_config_from_args
    from gridllm.stack_keys import StackKeys

    monkeypatch.delenv("GRIDLLM_API_KEY", raising=False)
    key = "up-key-0123456789"
    config = stack_config_from_args(build_parser().parse_args(
        ["up", "--api-key", key, "--auth-metrics", "--max-concurrent-streams", "64"]))
    args = config.router_args()
    assert key not in " ".join(args) and "--api-key" not in args
    assert "--auth-metrics" in args and args[args.index("--max-concurrent-streams") + 1] == "64"
    keys = StackKeys(config.router_options.api_keys, config.router_options.api_key_file)
    flag, path = keys.router_args(str(tmp_path))
    with open(path) as f:
        text = f.read()
    assert flag == "--api-key-file" and key not in text and len(text.splitlines()) == 2
    assert keys.keyring.authenticate(f"Bearer {key}") is not None
    assert StackKeys([], None).router_args(str(tmp_path)) == []


def test_up_refuses_a_bad_value_before_starting_anything():
    from gridllm.cli import stack_config_from_args

    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        stack_config_from_args(build_parser().parse_args(["up", "--gpu-memory-utilization",
                                                          "1.5"]))


def test_up_passes_the_tensor_parallel_size_on_to_every_worker():
    from gridllm.cli import stack_config_from_args

    config = stack_config_from_args(build_parser().parse_args(
        ["up", "--tensor-parallel-size", "2", "--workers", "2"]))
    assert config.model_config.tensor_parallel_size == 2
    args = config.worker_args()
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    # The default (one device) adds no flag.
    assert "--tensor-parallel-size" not in stack_config_from_args(
        build_parser().parse_args(["up"])).worker_args()
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        stack_config_from_args(build_parser().parse_args(["up", "--tensor-parallel-size",
                                                          "0"]))


def test_serving_docs_list_exactly_the_up_flags():
    up = build_parser()._subparsers._group_actions[0].choices["up"]
    flags = {s for a in up._actions for s in a.option_strings
             if s.startswith("--") and not s.startswith("--no-") and s != "--help"}
    with open(os.path.join(ROOT, "docs", "serving.md")) as f:
        documented = set(re.findall(r"^\| `(--[a-z-]+)", f.read(), flags=re.MULTILINE))
    assert documented == flags


def test_up_with_several_schedulers_gives_each_its_own_worker_group():
    from gridllm.cli import stack_config_from_args
    from gridllm.launcher import LocalStack

    args = build_parser().parse_args(["up", "--schedulers", "3", "--workers", "2",
                                      "--routing-policy", "least_load", "--max-workers", "2"])
    config = stack_config_from_args(args)
    assert (config.num_schedulers, config.num_workers) == (3, 2)
    assert [config.worker_group(i) for i in range(3)] == ["group-0", "group-1", "group-2"]
    # The stack sets each process's group itself; the settings it passes on do not.
    assert "--worker-group" not in config.scheduler_args() + config.worker_args()
    assert "--max-workers" in config.scheduler_args()
    assert config.router_args()[config.router_args().index("--routing-policy") + 1] == \
        "least_load"
    stack = LocalStack(config)
    assert stack.schedulers == [None, None, None] and stack.scheduler is None
    # One scheduler keeps the default group (and the flags of a single-scheduler stack).
    single = stack_config_from_args(build_parser().parse_args(["up"]))
    assert single.worker_group(0) == ""
    with pytest.raises(ValueError, match="num_schedulers"):
        stack_config_from_args(build_parser().parse_args(["up", "--schedulers", "0"]))
