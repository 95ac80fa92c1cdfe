"""Upstream request ids: scoped per request, the client's id recoverable for the logs."""

from __future__ import annotations

from gridllm.common.request_ids import new_scope, scoped, unscoped


def test_scopes_differ_and_the_clients_id_comes_back():
    scopes = {new_scope() for _ in range(1000)}
    assert len(scopes) == 1000
    scope = new_scope()
    for client_id in ("req", "req-0", "a@b", "x~1", "user@example.com-1"):
        upstream = scoped(client_id, scope)
        assert upstream != client_id and upstream != scoped(client_id, new_scope())
        assert unscoped(upstream) == client_id
        # A resubmission keeps its attempt number.
        assert unscoped(f"{upstream}~2") == f"{client_id}~2"
    # An id that was never scoped is left as it is.
    assert unscoped("plain@id") == "plain@id"
