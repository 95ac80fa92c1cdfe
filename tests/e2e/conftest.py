"""The e2e stack: a real Redis, one scheduler, two workers and the router on loopback.

Started once per module through ``gridllm.launcher`` (the code ``gridllm up`` runs), on free
ports, with the tiny model of ``tests.e2e.tiny_model``. Logs land in a tmp dir and are
printed when a start fails.
"""

from __future__ import annotations

import pytest

from gridllm.common.config import CacheConfig
from gridllm.launcher import LocalStack, StackConfig
from router.server import RouterOptions
from scheduler_svc.server import SchedulerServiceConfig
from tests.e2e.tiny_model import build_tiny_served_model

# KV blocks per worker: room for one request of MAX_MODEL_LEN tokens (16 per block).
NUM_KV_BLOCKS = 272
# The name the router reports instead of the model's path.
SERVED_MODEL_NAME = "tiny-served"


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory) -> str:
    return build_tiny_served_model(tmp_path_factory.mktemp("tiny-served-model"))


@pytest.fixture(scope="session")
def e2e_redis_url(redis_server) -> str:
    """A database of the session's Redis used only by the e2e stack (flushed first)."""
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def stack_config(model: str, redis_url: str, log_dir: str, **changes) -> StackConfig:
    """The e2e stack's settings (``changes`` override StackConfig fields)."""
    settings = dict(
        model=model, num_workers=2, port=0, redis_url=redis_url, log_dir=log_dir,
        startup_timeout_s=120.0, stop_grace_s=5.0,
        cache_config=CacheConfig(num_kv_blocks=NUM_KV_BLOCKS),
        # Frequent looks so a restarted or stopped worker is noticed quickly.
        scheduler_options=SchedulerServiceConfig(discovery_interval=0.3),
        router_options=RouterOptions(model=model, served_model_name=SERVED_MODEL_NAME),
        env={"GRIDLLM_LOGGING_LEVEL": "INFO"})
    return StackConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def stack(tiny_served_model, e2e_redis_url, tmp_path_factory):
    config = stack_config(tiny_served_model, e2e_redis_url,
                          str(tmp_path_factory.mktemp("stack-logs")))
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
