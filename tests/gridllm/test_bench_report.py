"""What every benchmark result records about its machine: the kernel switches set in the
environment (so the two sides of an A/B run say which they are), and no other variable."""

from __future__ import annotations

import pathlib
import re

from gridllm.bench.report import KERNEL_SWITCHES, machine_info

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_results_record_the_kernel_switches_that_are_set(monkeypatch):
    for name in KERNEL_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRIDLLM_SPLIT_ONE_TOKEN", "1")
    monkeypatch.setenv("GRIDLLM_GLUON_PREFILL", "0")
    monkeypatch.setenv("GRIDLLM_API_KEY", "secret")
    info = machine_info("cpu")
    assert info["kernel_switches"] == {"GRIDLLM_SPLIT_ONE_TOKEN": "1",
                                       "GRIDLLM_GLUON_PREFILL": "0"}
    assert "secret" not in repr(info)


def test_every_switch_the_kernels_and_layers_read_is_recorded():
    read = set()
    paths = [*(ROOT / "kernels").rglob("*.py"), *(ROOT / "worker_svc/layers").rglob("*.py"),
             ROOT / "worker_svc/piecewise_graph.py"]
    for path in paths:
        read |= set(re.findall(r"\"(GRIDLLM_[A-Z0-9_]+)\"", path.read_text()))
    assert read and read <= set(KERNEL_SWITCHES), sorted(read - set(KERNEL_SWITCHES))
