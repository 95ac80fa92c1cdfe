"""API keys: where they come from, how they are kept, and the gRPC check on the public server.

A key reaches the router from ``--api-key KEY`` (repeatable), the environment variable
``GRIDLLM_API_KEY`` (one key), or ``--api-key-file PATH``: one key per line, ``KEY [TENANT]``,
where KEY is the key itself or ``sha256:<64 hex digits>`` (its SHA-256, so the file need not
hold the secret); blank lines and lines starting with ``#`` are skipped. A key without a
tenant gets ``key-<first 8 hex digits of its SHA-256>``. Only the SHA-256 digests are kept in
memory; a presented key is hashed and compared to every digest in constant time.

Clients send ``authorization: Bearer KEY`` (gRPC metadata or the HTTP header). The tenant a
key maps to rides with the request: ``tenant_var`` while the router serves it, the metadata
``x-gridllm-tenant`` on the scheduler's Submit, the access log and the router's metrics.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

logger = logging.getLogger(__name__)

API_KEY_ENV = "GRIDLLM_API_KEY"
# The header (HTTP) and metadata key (gRPC) carrying ``Bearer KEY``.
AUTHORIZATION_KEY = "authorization"
# Invocation metadata of the router's Submit: the tenant the request belongs to.
TENANT_KEY = "x-gridllm-tenant"
HASHED_PREFIX = "sha256:"
MIN_KEY_LEN = 8
# Services a gRPC client may call without a key unless told otherwise (method prefixes).
HEALTH_METHODS = ("/grpc.health.v1.Health/",)
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/",
                      "/grpc.reflection.v1.ServerReflection/")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_DIGEST_RE = re.compile(r"^[0-9a-fA-F]{64}$")

# The tenant of the request being served ("" without keys: everyone is one tenant).
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("gridllm_tenant", default="")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its SHA-256 digest and the tenant it maps to."""

    digest: bytes
    tenant: str


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_tenant(digest: bytes) -> str:
    """The tenant of a key given without one: stable, and reveals nothing usable."""
    return f"key-{digest.hex()[:8]}"


def check_tenant(tenant: str, source: str = "tenant") -> str:
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"{source}: a tenant must be 1-64 characters of letters, digits, '.', "
                         f"'_' or '-' (starting with a letter or digit), got {tenant!r}.")
    return tenant


def parse_key(text: str, source: str = "api_key") -> bytes:
    """The digest of a key given as itself or as ``sha256:<hex>`` (ValueError naming
    ``source``)."""
    if text.startswith(HASHED_PREFIX):
        hexdigest = text[len(HASHED_PREFIX):]
        if not _HEX_DIGEST_RE.match(hexdigest):
            raise ValueError(f"{source}: {HASHED_PREFIX} must be followed by 64 hex digits.")
        return bytes.fromhex(hexdigest)
    if len(text) < MIN_KEY_LEN or not text.isprintable() or any(c.isspace() for c in text):
        # Never echo the key itself: it may be a real one with a typo.
        raise ValueError(f"{source}: an API key must be at least {MIN_KEY_LEN} printable "
                         "characters without spaces.")
    return key_digest(text)


def parse_key_lines(text: str, source: str) -> list[ApiKey]:
    """The keys of a key file's text (``KEY [TENANT]`` per line)."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{source}:{number}"
        if len(fields) > 2:
            raise ValueError(f"{where}: expected `KEY [TENANT]`, got {len(fields)} fields.")
        digest = parse_key(fields[0], where)
        tenant = check_tenant(fields[1], where) if len(fields) == 2 else default_tenant(digest)
        keys.append(ApiKey(digest, tenant))
    return keys


def read_key_file(path: str) -> list[ApiKey]:
    """The keys of ``path`` (ValueError naming the file and line; OSError if unreadable)."""
    with open(path, encoding="utf-8") as f:
        keys = parse_key_lines(f.read(), f"api_key_file {path}")
    if not keys:
        raise ValueError(f"api_key_file {path} holds no keys (one `KEY [TENANT]` per line).")
    return keys


def load_keys(api_keys: Iterable[str] = (), api_key_file: str | None = None,
              environ: Mapping[str, str] | None = None) -> list[ApiKey]:
    """Every key configured: the flags', ``$GRIDLLM_API_KEY``'s, then the file's."""
    environ = os.environ if environ is None else environ
    keys = [ApiKey(d, default_tenant(d)) for d in (parse_key(k) for k in api_keys)]
    if environ.get(API_KEY_ENV):
        digest = parse_key(environ[API_KEY_ENV], API_KEY_ENV)
        keys.append(ApiKey(digest, default_tenant(digest)))
    if api_key_file:
        keys += read_key_file(api_key_file)
    return keys


class KeyRing:
    """The accepted keys (digests only). Empty: authentication is off.

    Raises:
        ValueError: one key is mapped to two tenants.
    """

    def __init__(self, keys: Iterable[ApiKey] = ()):
        tenants: dict[bytes, str] = {}
        for key in keys:
            if tenants.setdefault(key.digest, key.tenant) != key.tenant:
                raise ValueError(f"api keys: one key is given for two tenants "
                                 f"({tenants[key.digest]!r} and {key.tenant!r}).")
        self._keys = [ApiKey(d, t) for d, t in tenants.items()]

    @property
    def is_enabled(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> list[str]:
        return sorted({k.tenant for k in self._keys})

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant of an ``authorization`` value (``Bearer KEY``), or None if it is not
        one of the keys. Every digest is compared, in constant time each."""
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = key_digest(token)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.tenant
        return found

    def to_lines(self) -> str:
        """A key file holding the digests (``sha256:<hex> TENANT`` per line)."""
        return "".join(f"{HASHED_PREFIX}{k.digest.hex()} {k.tenant}\n" for k in self._keys)


def bearer_token(authorization: str | None) -> str | None:
    """KEY of ``Bearer KEY`` (the scheme in any case), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, keyring: KeyRing, what: str) -> bool:
    """Log a warning when ``what`` binds beyond loopback without API keys; True if so."""
    if keyring.is_enabled or is_loopback(host):
        return False
    logger.warning("%s binds %s without API keys: anyone who reaches it can generate. "
                   "Give --api-key KEY, GRIDLLM_API_KEY or --api-key-file PATH, or bind "
                   "127.0.0.1.", what, host)
    return True


# ----------------------------------------------------------------------- gRPC
_UNAUTHENTICATED = ("a valid API key is required: send the metadata `authorization: Bearer "
                    "KEY`.")


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)


def _with_tenant(behavior: Callable, tenant: str) -> Callable:
    # The handler runs with tenant_var set, in its own context (not the interceptor's).
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext):
            tenant_var.set(tenant)
            async for item in behavior(request, context):
                yield item
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext):
        tenant_var.set(tenant)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result
    return unary


_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid ``authorization: Bearer KEY`` with UNAUTHENTICATED
    (before the request is parsed); the handler of an accepted call sees its tenant in
    ``tenant_var``.

    Args:
        keyring: the accepted keys (empty: every call passes, tenant "").
        open_methods: method prefixes callable without a key (health, reflection).
    """

    def __init__(self, keyring: KeyRing, open_methods: Iterable[str] = ()):
        self.keyring = keyring
        self.open_methods = tuple(open_methods)

    async def intercept_service(self, continuation: Callable[..., Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if (handler is None or not self.keyring.is_enabled
                or handler_call_details.method.startswith(self.open_methods)):
            return handler
        authorization = next((v for k, v in handler_call_details.invocation_metadata or ()
                              if k == AUTHORIZATION_KEY), None)
        tenant = self.keyring.authenticate(authorization)
        for attr, factory in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is None:
                continue
            if tenant is None:
                # No deserializer: an unauthenticated caller's bytes are never parsed.
                return factory(_refuse, request_deserializer=None,
                               response_serializer=handler.response_serializer)
            return factory(_with_tenant(behavior, tenant),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
        return handler


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying ``api_key`` (none without one)."""
    return ((AUTHORIZATION_KEY, f"Bearer {api_key}"),) if api_key else ()
