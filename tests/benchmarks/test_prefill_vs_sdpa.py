"""``benchmarks/prefill_vs_sdpa.py``: its shapes and alternative launches on the command
line (the timing itself needs a CUDA GPU)."""

from __future__ import annotations

import argparse

import pytest

import benchmarks.prefill_vs_sdpa as pvs


def test_shapes_and_launches_parse():
    assert pvs.parse_shape("4x4096") == (4, 4096)
    assert pvs.parse_shape("16X1024") == (16, 1024)
    assert pvs.parse_alt("overlap=0") == {"overlap": 0}
    assert pvs.parse_alt("stages=2,overlap=1") == {"stages": 2, "overlap": 1}


@pytest.mark.parametrize("text,match", [("4096", "--shapes"), ("0x4096", "positive"),
                                        ("4xmany", "--shapes")])
def test_a_bad_shape_names_the_option(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        pvs.parse_shape(text)


@pytest.mark.parametrize("text,match", [("overlap", "KEY=INT"), ("=1", "KEY=INT"),
                                        ("stages=two", "--alt stages must be an integer")])
def test_a_bad_launch_names_the_option(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        pvs.parse_alt(text)
