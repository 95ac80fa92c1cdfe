"""Session fixtures shared by every test package."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported: without a GPU, kernels
# run in its interpreter, whichever test package imports them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.redis_fixture import redis_server  # noqa: E402,F401 - re-exported fixture
