"""Shared fixtures: tiny random models of every architecture, built once per session."""

from __future__ import annotations

import pytest

from tests.worker_svc.tiny_models import ALL_TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(arch) -> str`` path of a saved tiny model (cached)."""
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(params=sorted(ALL_TINY_ARCHS))
def tiny_arch(request) -> str:
    """Every tiny architecture in turn."""
    return request.param
