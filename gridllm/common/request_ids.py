"""The ids the router's requests carry upstream: the client's, scoped to one request.

Clients choose their request ids, and the router derives ``id-0``, ``id-1``... for ``n`` > 1,
so two clients (or tenants) may well send the same ones. Upstream every completion runs as
``{child id}@{scope}``, the scope being 16 random hex digits drawn for each request: no
request can collide with another client's, and no caller can name (and so abort) a request
whose scope it never saw. Responses and the logs keep showing the client's id (the Submit's
``x-request-id`` metadata carries it to the scheduler's log lines; workers log ``unscoped``).
"""

from __future__ import annotations

import re
import secrets

SCOPE_SEPARATOR = "@"
_SCOPE_RE = re.compile(r"@[0-9a-f]{16}(?=~\d+$|$)")


def new_scope() -> str:
    return secrets.token_hex(8)


def scoped(child_id: str, scope: str) -> str:
    """The upstream id of the completion ``child_id`` of a request with ``scope``."""
    return f"{child_id}{SCOPE_SEPARATOR}{scope}"


def unscoped(upstream_id: str) -> str:
    """The client's (child) id of an upstream id, a resubmission's ``~N`` kept."""
    return _SCOPE_RE.sub("", upstream_id, count=1)
