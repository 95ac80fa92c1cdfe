"""Every tiny architecture in turn (`tiny_model_dir` is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.worker_svc.tiny_models import ALL_TINY_ARCHS


@pytest.fixture(params=sorted(ALL_TINY_ARCHS))
def tiny_arch(request) -> str:
    """Every tiny architecture in turn."""
    return request.param
