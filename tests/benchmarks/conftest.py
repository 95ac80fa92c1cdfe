"""Benchmark helpers that hold kernels run in Triton's interpreter without CUDA (set before
any ``@triton.jit`` decoration, as in ``tests/kernels``)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
