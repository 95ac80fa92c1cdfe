"""Transport security of every hop: TLS on the public API, mutual TLS between the services.

Each service holds the deployment's CA certificate and its own certificate and key (PEM),
given as ``--tls-ca/--tls-cert/--tls-key`` or as one ``--tls-dir`` holding ``ca.crt``,
``tls.crt`` and ``tls.key`` (the layout of a Kubernetes TLS secret). With them:

- the scheduler and the workers serve only clients presenting a certificate the CA signed
  (a router or scheduler of another deployment, or none, fails the handshake);
- the router serves its public gRPC and HTTP APIs over TLS (clients check it against the CA);
- every internal client presents its own certificate and checks the server's against the CA
  and the server's role name (``gridllm-scheduler``, ``gridllm-worker``), not its address:
  workers and schedulers come and go at addresses nobody knows when certificates are made.

Without any of the three, every hop is plaintext (a trusted network only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from gridllm.common.cli_args import option

# Names an internal server's certificate carries (a DNS subject alternative name) and its
# clients verify: being signed by the deployment's CA for this role is what counts.
ROUTER_SERVER_NAME = "gridllm-router"
SCHEDULER_SERVER_NAME = "gridllm-scheduler"
WORKER_SERVER_NAME = "gridllm-worker"
# The files of a --tls-dir.
CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
_FIELDS = ("tls_cert", "tls_key", "tls_ca")


@dataclass
class TlsOptions:
    tls_dir: str | None = option(
        None, metavar="DIR", default_help="off",
        help=f"directory with {CA_FILE}, {CERT_FILE} and {KEY_FILE} (a Kubernetes TLS "
             "secret's layout): the same as the three flags below")
    tls_cert: str | None = option(
        None, metavar="FILE", default_help="off",
        help="this service's certificate chain (PEM), signed by the deployment's CA")
    tls_key: str | None = option(None, metavar="FILE", default_help="off",
                                 help="the private key of --tls-cert (PEM)")
    tls_ca: str | None = option(
        None, metavar="FILE", default_help="off",
        help="the deployment's CA certificate (PEM): internal peers must present a "
             "certificate it signed (mutual TLS)")

    def __post_init__(self) -> None:
        if self.tls_dir is not None:
            if not os.path.isdir(self.tls_dir):
                raise ValueError(f"tls_dir must be a directory, got {self.tls_dir!r}.")
            files = {"tls_cert": CERT_FILE, "tls_key": KEY_FILE, "tls_ca": CA_FILE}
            for name, file in files.items():
                if getattr(self, name) is None:
                    setattr(self, name, os.path.join(self.tls_dir, file))
        given = [name for name in _FIELDS if getattr(self, name) is not None]
        if given and len(given) != len(_FIELDS):
            missing = sorted(set(_FIELDS) - set(given))
            raise ValueError(f"{missing[0]} must be given with {', '.join(given)}: TLS needs "
                             "the certificate, its key and the deployment's CA (or --tls-dir).")
        for name in given:
            path = getattr(self, name)
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ValueError(f"{name} must be a readable file, got {path!r}.")

    @property
    def is_enabled(self) -> bool:
        return self.tls_cert is not None

    def _read(self) -> tuple[bytes, bytes, bytes]:
        assert self.tls_ca and self.tls_cert and self.tls_key
        with open(self.tls_ca, "rb") as ca, open(self.tls_cert, "rb") as cert, \
                open(self.tls_key, "rb") as key:
            return ca.read(), cert.read(), key.read()

    def server_credentials(self, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """Serve with this certificate; with ``require_client_cert``, only clients whose
        certificate the CA signed get past the handshake."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial with this certificate, trusting only servers the CA signed."""
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """uvicorn.Config arguments serving HTTPS with this certificate."""
        return {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}


def server_credentials(tls: TlsOptions | None, require_client_cert: bool = True
                       ) -> grpc.ServerCredentials | None:
    """Credentials for a ServiceServer (None: plaintext)."""
    if tls is None or not tls.is_enabled:
        return None
    return tls.server_credentials(require_client_cert)


def internal_channel(address: str, tls: TlsOptions | None, server_name: str,
                     options: list[tuple] | None = None) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to another service: mutual TLS when ``tls`` is enabled (the
    server must hold a certificate for ``server_name`` signed by the CA), else plaintext."""
    options = list(options or [])
    if tls is None or not tls.is_enabled:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(),
        options=options + [("grpc.ssl_target_name_override", server_name)])


def blocking_channel(address: str, tls: TlsOptions | None, server_name: str | None = None,
                     options: list[tuple] | None = None) -> grpc.Channel:
    """The blocking counterpart of ``internal_channel`` (probes, the launcher's waits);
    ``server_name`` None checks the certificate against the address dialed."""
    options = list(options or [])
    if tls is None or not tls.is_enabled:
        return grpc.insecure_channel(address, options=options)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)
