"""TLS options, certificates, Redis URLs with credentials and over TLS (``rediss://``).

``rediss://`` runs against the session's real Redis behind a TLS terminator started here
(the embedded Redis servers are built without TLS), with certificates made in the test.
"""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from gridllm.common.redis_client import (
    RedisAuthError,
    async_redis,
    check_redis,
    mask_url,
)
from gridllm.common.redis_keys import RedisKeys, check_deployment
from gridllm.common.tls import CA_FILE, CERT_FILE, KEY_FILE, TlsOptions
from gridllm.common.tls_certs import LOCAL_NAMES, Authority, make_stack_certs


def test_tls_dir_fills_the_three_files_and_partial_settings_name_the_missing_one(tmp_path):
    path = Authority().write_tls_dir(str(tmp_path / "svc"), "gridllm-worker")
    options = TlsOptions(tls_dir=path)
    assert options.is_enabled
    assert (options.tls_ca, options.tls_cert, options.tls_key) == tuple(
        os.path.join(path, f) for f in (CA_FILE, CERT_FILE, KEY_FILE))
    assert oct(os.stat(options.tls_key).st_mode & 0o777) == "0o600"
    assert not TlsOptions().is_enabled
    with pytest.raises(ValueError, match="tls_key must be given"):
        TlsOptions(tls_cert=options.tls_cert, tls_ca=options.tls_ca)
    with pytest.raises(ValueError, match="tls_ca must be a readable file"):
        TlsOptions(tls_cert=options.tls_cert, tls_key=options.tls_key,
                   tls_ca=str(tmp_path / "missing.crt"))
    with pytest.raises(ValueError, match="tls_dir must be a directory"):
        TlsOptions(tls_dir=str(tmp_path / "nowhere"))


def test_stack_certificates_name_each_role_and_chain_to_one_ca(tmp_path):
    from cryptography import x509

    dirs = make_stack_certs(str(tmp_path), hosts=["router.example"])
    assert set(dirs) == {"router", "scheduler", "worker"}
    cas = set()
    for role, path in dirs.items():
        with open(os.path.join(path, CERT_FILE), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(path, CA_FILE), "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        cert.verify_directly_issued_by(ca)
        cas.add(ca.fingerprint(ca.signature_hash_algorithm))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(names.get_values_for_type(x509.DNSName))
        assert f"gridllm-{role}" in dns and "localhost" in dns
        assert ("router.example" in dns) == (role == "router")
    assert len(cas) == 1
    assert not any(name.endswith(".key") and "ca" in name for name in os.listdir(tmp_path))


def test_mask_url_hides_the_password_only():
    assert mask_url("redis://:s3cret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    assert mask_url("rediss://alice:p%40ss@[::1]:6380/2?ssl_ca_certs=/ca.crt") == \
        "rediss://alice:***@[::1]:6380/2?ssl_ca_certs=/ca.crt"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("name", ["", "a:b", "a*", "{x}", "x" * 65, "-lead"])
def test_bad_deployment_names_are_refused_naming_the_field(name):
    with pytest.raises(ValueError, match="deployment must be"):
        RedisKeys(name)
    with pytest.raises(ValueError, match="--deployment must be"):
        check_deployment(name, "--deployment")


def test_keys_of_a_deployment_share_its_prefix():
    keys = RedisKeys("prod-eu.1")
    built = [keys.worker_key("w"), keys.scheduler_key("s"), keys.kv_cached_key("w"),
             keys.kv_state_key("w"), keys.kv_tables_key("w"), keys.kv_events_stream,
             keys.kv_events_seq, keys.worker_pattern, keys.scheduler_pattern,
             keys.kv_cached_pattern]
    assert all(k.startswith("gridllm:prod-eu.1:") for k in built)
    assert keys.worker_of_cached_key(keys.kv_cached_key("w-1")) == "w-1"


async def _tls_terminator(ca: Authority, target_port: int, tmp_path) -> asyncio.base_events.Server:
    """A TLS listener on loopback forwarding each connection to Redis in plaintext."""
    path = ca.write_tls_dir(str(tmp_path / "redis-tls"), "redis", LOCAL_NAMES)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.join(path, CERT_FILE), os.path.join(path, KEY_FILE))

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


def test_rediss_url_verifies_the_server_against_its_ca(redis_server, tmp_path):
    ca, other = Authority(), Authority("another CA")
    other_ca = tmp_path / "other.crt"
    other_ca.write_bytes(other.cert_pem)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])

    async def main():
        server = await _tls_terminator(ca, redis_port, tmp_path)
        port = server.sockets[0].getsockname()[1]
        try:
            good = async_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}")
            await check_redis(good, "rediss://...")
            await good.set("gridllm:tls-probe", "1")
            value = await good.get("gridllm:tls-probe")
            await good.delete("gridllm:tls-probe")
            await good.aclose()
            bad = async_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}")
            with pytest.raises(Exception) as failure:
                await bad.ping()
            await bad.aclose()
            return value, failure.value
        finally:
            server.close()

    value, error = asyncio.run(main())
    assert value == b"1"
    assert "certificate verify failed" in str(error) or isinstance(error, ssl.SSLError)


def test_check_redis_names_the_masked_url_on_wrong_credentials(redis_server):
    import redis

    async def main():
        client = async_redis(redis_server)
        await client.acl_setuser("gridllm-probe", enabled=True, passwords=["+right"],
                                 keys=["gridllm:*"], commands=["+@all"])
        try:
            host = redis_server.split("://", 1)[1]
            good = f"redis://gridllm-probe:right@{host}"
            wrong = f"redis://gridllm-probe:wrong@{host}"
            ok = async_redis(good)
            await check_redis(ok, good)
            await ok.aclose()
            bad = async_redis(wrong)
            with pytest.raises(RedisAuthError) as failure:
                await check_redis(bad, wrong)
            await bad.aclose()
            # Redis down is not final: the services' loops retry.
            down = async_redis("redis://127.0.0.1:1/0")
            await check_redis(down, "redis://127.0.0.1:1/0")
            await down.aclose()
            return str(failure.value)
        finally:
            await client.acl_deluser("gridllm-probe")
            await client.aclose()

    try:
        message = asyncio.run(main())
    except redis.ResponseError as exc:  # a server without ACLs (Redis < 6)
        pytest.skip(f"no ACL support: {exc}")
    assert "redis://gridllm-probe:***@" in message and "wrong" not in message.split("(")[0]
