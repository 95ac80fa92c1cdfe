"""API keys: key files, hashing, the constant-time check, and the exposure warning."""

from __future__ import annotations

import hashlib
import logging

import pytest

from gridllm.common.auth import (
    API_KEY_ENV,
    KeyRing,
    bearer_token,
    is_loopback,
    load_keys,
    parse_key_lines,
    read_key_file,
    warn_if_open,
)

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_file_maps_keys_and_digests_to_tenants(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n\n{ALICE} alice\nsha256:{sha(BOB)}   bob\n"
                    f"untenanted-key-42\n")
    ring = KeyRing(read_key_file(str(path)))
    assert ring.authenticate(f"Bearer {ALICE}") == "alice"
    # The file held only the digest of bob's key; the key itself still works.
    assert ring.authenticate(f"bearer {BOB}") == "bob"
    assert ring.authenticate("Bearer untenanted-key-42") == f"key-{sha('untenanted-key-42')[:8]}"
    for refused in (None, "", ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", "Bearer ",
                    f"Bearer sha256:{sha(BOB)}"):
        assert ring.authenticate(refused) is None, refused
    # Only digests are kept: nothing the ring holds or writes out contains a key.
    assert ALICE not in ring.to_lines() and BOB not in ring.to_lines()
    assert KeyRing(parse_key_lines(ring.to_lines(), "copy")).authenticate(
        f"Bearer {ALICE}") == "alice"


@pytest.mark.parametrize("line,problem", [
    ("short alice", "at least 8"),
    (f"{ALICE} alice extra", "got 3 fields"),
    (f"{ALICE} al/ice", "tenant"),
    ("sha256:abcd alice", "64 hex digits"),
])
def test_a_bad_key_file_line_is_named_by_file_and_line(tmp_path, line, problem):
    path = tmp_path / "keys"
    path.write_text(f"{BOB} bob\n{line}\n")
    with pytest.raises(ValueError, match=problem) as info:
        read_key_file(str(path))
    assert f"{path}:2" in str(info.value)
    assert line.split()[0] not in str(info.value)  # a key (or typo of one) is never echoed


def test_an_empty_key_file_is_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no keys"):
        read_key_file(str(path))


def test_keys_come_from_flags_environment_and_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{BOB} bob\n")
    keys = load_keys([ALICE], str(path), {API_KEY_ENV: "env-key-0123456789"})
    ring = KeyRing(keys)
    assert ring.tenants == sorted(["bob", f"key-{sha(ALICE)[:8]}",
                                   f"key-{sha('env-key-0123456789')[:8]}"])
    assert not KeyRing(load_keys([], None, {})).is_enabled
    assert not KeyRing(load_keys([], None, {API_KEY_ENV: ""})).is_enabled  # compose: unset
    with pytest.raises(ValueError, match=API_KEY_ENV):
        load_keys([], None, {API_KEY_ENV: "short"})


def test_one_key_for_two_tenants_is_refused():
    with pytest.raises(ValueError, match="two tenants"):
        KeyRing(parse_key_lines(f"{ALICE} alice\nsha256:{sha(ALICE)} mallory\n", "keys"))


def test_bearer_token_and_loopback():
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("Token abc") is None
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_binding_beyond_loopback_without_keys_warns(caplog):
    keyed = KeyRing(load_keys([ALICE], None, {}))
    with caplog.at_level(logging.WARNING, logger="gridllm.common.auth"):
        assert warn_if_open("0.0.0.0", KeyRing(), "the router")
        assert not warn_if_open("127.0.0.1", KeyRing(), "the router")
        assert not warn_if_open("0.0.0.0", keyed, "the router")
    (record,) = caplog.records
    assert "0.0.0.0 without API keys" in record.getMessage()
