"""The router's API-key checks: which calls need a key, on the gRPC and the HTTP front.

gRPC: ``gridllm.common.auth.AuthInterceptor`` (UNAUTHENTICATED). HTTP: an ASGI wrapper
answering 401 with an OpenAI error object (``invalid_api_key``), as OpenAI does, so the
official clients raise ``AuthenticationError``. Health (gRPC health, ``/health``,
``/ready``), reflection and ``/metrics`` stay open unless told otherwise: probes and
scrapers carry no keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from gridllm.common.auth import (
    HEALTH_METHODS,
    REFLECTION_METHODS,
    AuthInterceptor,
    KeyRing,
    load_keys,
    tenant_var,
)
from router.openai_protocol import ApiError

_HEALTH_PATHS = ("/health", "/ready")
_METRICS_PATHS = ("/metrics",)


@dataclass
class RouterAuth:
    """The keys and what is open without one.

    Args:
        keyring: the accepted keys (empty: everything is open).
        is_health_open: gRPC health and HTTP ``/health``, ``/ready`` need no key.
        is_reflection_open: gRPC server reflection needs no key.
        is_metrics_open: HTTP ``/metrics`` needs no key.
    """

    keyring: KeyRing
    is_health_open: bool = True
    is_reflection_open: bool = True
    is_metrics_open: bool = True

    @classmethod
    def from_options(cls, api_keys: list[str], api_key_file: str | None, auth_health: bool,
                     auth_reflection: bool, auth_metrics: bool) -> RouterAuth:
        """From the router's flags (and ``$GRIDLLM_API_KEY``); ValueError naming a bad key
        or key-file line."""
        return cls(KeyRing(load_keys(api_keys, api_key_file)), not auth_health,
                   not auth_reflection, not auth_metrics)

    def grpc_interceptor(self) -> AuthInterceptor:
        open_methods = ((HEALTH_METHODS if self.is_health_open else ())
                        + (REFLECTION_METHODS if self.is_reflection_open else ()))
        return AuthInterceptor(self.keyring, open_methods)

    @property
    def open_paths(self) -> tuple[str, ...]:
        return ((_HEALTH_PATHS if self.is_health_open else ())
                + (_METRICS_PATHS if self.is_metrics_open else ()))

    def http(self, app: Callable) -> Callable:
        """``app`` behind the key check: a request without a valid ``Authorization: Bearer
        KEY`` gets 401; an accepted one runs with its tenant in ``tenant_var``."""
        keyring, open_paths = self.keyring, self.open_paths

        async def checked(scope: dict, receive: Callable, send: Callable) -> Any:
            if (scope["type"] != "http" or not keyring.is_enabled
                    or scope["path"] in open_paths):
                return await app(scope, receive, send)
            authorization = next((v.decode("latin-1") for k, v in scope["headers"]
                                  if k == b"authorization"), None)
            tenant = keyring.authenticate(authorization)
            if tenant is None:
                return await unauthorized(authorization)(scope, receive, send)
            token = tenant_var.set(tenant)
            try:
                return await app(scope, receive, send)
            finally:
                tenant_var.reset(token)
        return checked


def unauthorized(authorization: str | None) -> JSONResponse:
    """OpenAI's 401 answer (the key itself is never echoed)."""
    message = ("Incorrect API key provided." if authorization else
               "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.")
    error = ApiError(401, message, None, "invalid_request_error", "invalid_api_key")
    return JSONResponse(error.body(), status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})
