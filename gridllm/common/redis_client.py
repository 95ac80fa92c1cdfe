"""The services' Redis client: every wait bounded.

Redis serves discovery, heartbeats and the block-state mirror, all in background loops that
log and retry. Without timeouts a Redis that stops answering (a hung process, a lost network
path) would hang those loops for good instead of letting them retry when it is back.
"""

from __future__ import annotations

from typing import Any

# Seconds one command may wait for its reply, and a connection for its handshake.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
# An idle pooled connection is checked with PING before use: after a Redis restart the
# first command does not fail on a dead socket.
HEALTH_CHECK_INTERVAL_S = 5


def async_redis(url: str) -> Any:
    """A ``redis.asyncio.Redis`` for ``url`` with bounded waits."""
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                             socket_connect_timeout=CONNECT_TIMEOUT_S,
                             health_check_interval=HEALTH_CHECK_INTERVAL_S)
