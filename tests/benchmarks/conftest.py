"""Benchmark helpers that hold kernels run in Triton's interpreter without CUDA (set before
any ``@triton.jit`` decoration, as in ``tests/kernels``); ``load_benchmark`` imports a
script of benchmarks/."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
