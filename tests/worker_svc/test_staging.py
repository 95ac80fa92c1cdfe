"""HostToDevice: a step's small arrays reach the device intact, whatever the rotation and
whether the tensors viewing a buffer were made for this layout or an earlier one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker_svc.staging import HostToDevice


def _arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(0, 1000, n, dtype=np.int64),
            "positions": rng.integers(0, 100, n).astype(np.int32),
            "temperature": rng.random(n, dtype=np.float32),
            "block_tables": rng.integers(0, 50, (n, 3)).astype(np.int32),
            "flags": rng.random(n) < 0.5}


def _check(staging: HostToDevice, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    dev = staging.send(arrays)
    assert list(dev) == list(arrays)
    for name, a in arrays.items():
        got = dev[name].cpu().numpy()
        assert got.dtype == a.dtype and got.shape == a.shape, name
        np.testing.assert_array_equal(got, a, err_msg=name)
    return dev


def test_cpu_wraps_the_arrays():
    rng = np.random.default_rng(0)
    _check(HostToDevice(torch.device("cpu")), _arrays(rng, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_repeated_and_changing_layouts_on_cuda():
    rng = np.random.default_rng(0)
    staging = HostToDevice(torch.device("cuda"), num_buffers=3)
    # The same layout many times (views reused per buffer), then other batch sizes, one
    # larger than the first buffers (they grow), then the first layout again.
    for n in [8] * 7 + [3, 8, 5000, 8, 8, 8, 1]:
        dev = _check(staging, _arrays(rng, n))
        # A step writes into its inputs (pending ids): it must not reach the next send.
        dev["input_ids"].fill_(-1)
    # The values of a send survive the next num_buffers - 1 sends.
    kept = _arrays(rng, 8)
    dev = staging.send(kept)
    for _ in range(2):
        staging.send(_arrays(rng, 8))
    np.testing.assert_array_equal(dev["input_ids"].cpu().numpy(), kept["input_ids"])
