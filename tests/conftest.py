"""Session fixtures shared by every test package."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported: without a GPU, kernels
# run in its interpreter, whichever test package imports them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.redis_fixture import redis_server  # noqa: E402,F401 - re-exported fixture
from tests.worker_svc.tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(arch) -> str`` path of a saved tiny model (cached)."""
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get
