"""Throwaway certificates: a deployment CA and one certificate per service.

``gridllm up --tls`` makes them for a local stack (and the tests for theirs). Production
deployments bring certificates from their own PKI (cert-manager, Vault, ...): each service's
certificate must carry its role name (``gridllm-router``, ``gridllm-scheduler``,
``gridllm-worker``) as a DNS name, and the router's also the names clients dial.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

from gridllm.common.tls import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    ROUTER_SERVER_NAME,
    SCHEDULER_SERVER_NAME,
    WORKER_SERVER_NAME,
)

# The names every certificate gridllm makes also carries: a local stack is dialed on them.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# The service roles of a stack, each with its own certificate.
ROLES = {"router": ROUTER_SERVER_NAME, "scheduler": SCHEDULER_SERVER_NAME,
         "worker": WORKER_SERVER_NAME}


class Authority:
    """A CA that signs service certificates.

    Args:
        common_name: the CA's subject.
        days: validity.
    """

    def __init__(self, common_name: str = "gridllm deployment CA", days: int = 30):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.days = days

    @property
    def cert_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, names: Iterable[str] = ()) -> tuple[bytes, bytes]:
        """A certificate for ``common_name`` (also a DNS name in it) and ``names`` (DNS
        names or IP addresses), good for serving and for dialing (server and client auth).

        Returns:
            (certificate PEM, private key PEM).
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        alt_names: list[Any] = []
        for entry in dict.fromkeys([common_name, *names]):
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                alt_names.append(x509.DNSName(entry))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def write_tls_dir(self, path: str, common_name: str, names: Iterable[str] = ()) -> str:
        """Issue a certificate and write ``ca.crt``, ``tls.crt`` and ``tls.key`` (readable by
        the owner only) into ``path``; returns ``path``."""
        cert, key = self.issue(common_name, names)
        os.makedirs(path, mode=0o700, exist_ok=True)
        for file, data in ((CA_FILE, self.cert_pem), (CERT_FILE, cert), (KEY_FILE, key)):
            target = os.path.join(path, file)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return path


def make_stack_certs(root: str, hosts: Iterable[str] = ()) -> dict[str, str]:
    """A fresh CA and a ``--tls-dir`` per service role under ``root`` (``root/<role>``);
    the CA's key is not kept, so nobody can add a certificate to this deployment later.

    Args:
        hosts: more names the router is dialed on (besides the local ones).
    Returns:
        role (``router``, ``scheduler``, ``worker``) -> its directory.
    """
    authority = Authority()
    extra = list(hosts)
    return {role: authority.write_tls_dir(os.path.join(root, role), name,
                                          [*LOCAL_NAMES, *(extra if role == "router" else ())])
            for role, name in ROLES.items()}
