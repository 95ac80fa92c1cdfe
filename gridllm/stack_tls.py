"""TLS of a local stack (``gridllm up --tls``): throwaway certificates and the flags and
probes that use them."""

from __future__ import annotations

import os
import socket

from gridllm.common.tls import (
    CA_FILE,
    ROUTER_SERVER_NAME,
    SCHEDULER_SERVER_NAME,
    WORKER_SERVER_NAME,
    TlsOptions,
)

# The name each role's server is checked against by the stack's probes.
SERVER_NAMES = {"router": ROUTER_SERVER_NAME, "scheduler": SCHEDULER_SERVER_NAME,
                "worker": WORKER_SERVER_NAME}


class StackTls:
    """A fresh CA and one certificate per role under ``root``.

    Args:
        root: directory for ``<role>/{ca.crt,tls.crt,tls.key}``.
        host: the router's bind address (its certificate names it, and this machine's
            hostname when it binds every interface).
    """

    def __init__(self, root: str, host: str):
        from gridllm.common.tls_certs import make_stack_certs

        hosts = [host] if host not in ("0.0.0.0", "::") else [socket.gethostname()]
        self.dirs = make_stack_certs(root, hosts)
        # The stack's probes dial as the router does: with its certificate.
        self.client = TlsOptions(tls_dir=self.dirs["router"])

    @property
    def ca_file(self) -> str:
        """The CA certificate clients trust (``Client(tls_ca=...)``, ``curl --cacert``)."""
        return os.path.join(self.dirs["router"], CA_FILE)

    def args(self, role: str) -> list[str]:
        """The flags giving ``role`` its certificate."""
        return ["--tls-dir", self.dirs[role]]
