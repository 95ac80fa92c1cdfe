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


class RedisAuthError(RuntimeError):
    """Redis refused the credentials of its URL: retrying cannot help."""


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and errors)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis refused the credentials (wrong password or ACL user, or
    none given where one is required)."""
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))


def auth_error(url: str, exc: BaseException) -> RedisAuthError:
    return RedisAuthError(
        f"Redis at {mask_url(url)} refused the credentials ({exc}): check the password or "
        "ACL user in the URL (redis://USER:PASSWORD@HOST:PORT/DB)")


async def check_redis(client: Any, url: str) -> None:
    """Fail fast on wrong credentials; any other trouble (Redis down or restarting) is left
    to the callers' retry loops.

    Raises:
        RedisAuthError: Redis refused the URL's password or user.
    """
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 - only refused credentials are final
        if is_auth_error(exc):
            raise auth_error(url, exc) from None
