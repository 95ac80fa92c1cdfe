"""``benchmarks/trace_kernels.py``: a gpu_busy trace's kernels per step, own and end to end."""

from __future__ import annotations

import gzip
import json

import pytest

import benchmarks.trace_kernels as tk


def _kernel(name, start, dur, grid=(1, 1, 1), cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": dur,
            "args": {"grid": list(grid)}}


def _trace(num_steps=3):
    """Steps of 100 us: a GEMV (20 us), a small kernel launched early behind it (starts at
    5, waits, ends at 24), a copy, then the once-a-step head (30 us); CPU events and a
    second grid of the GEMV mixed in."""
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]
    for step in range(num_steps):
        t = 100.0 * step
        events += [_kernel("gemv", t + 0, 20, (64, 1, 1)),
                   _kernel("small", t + 5, 19),
                   _kernel("Memcpy DtoD", t + 30, 2, cat="gpu_memcpy"),
                   _kernel("gemv", t + 40, 10, (8, 1, 1)),
                   _kernel("head", t + 60, 30)]
    return {"traceEvents": events[::-1]}


def test_end_to_end_times_add_up_to_the_step_and_skip_the_waits():
    events = tk.gpu_events(_trace())
    result = tk.kernel_table(events, "head")
    assert result["num_steps"] == 2 and result["step_us"] == pytest.approx(100.0)
    rows = {(k["name"], tuple(k["grid"] or ())): k for k in result["kernels"]}
    small = rows[("small", (1, 1, 1))]
    assert small["own_us_mean"] == 19 and small["end_to_end_us_mean"] == 4  # 20 -> 24
    big = rows[("gemv", (64, 1, 1))]
    # From the head's end (90) to its own (120): the 10 us the GPU idled count too.
    assert big["own_us_per_step"] == 20 and big["end_to_end_us_per_step"] == 30
    assert rows[("gemv", (8, 1, 1))]["end_to_end_us_per_step"] == 18  # 32 -> 50
    assert sum(k["end_to_end_us_per_step"] for k in result["kernels"]) == pytest.approx(
        result["step_us"])
    assert result["kernels"][0]["name"] == "head"  # the largest end-to-end time first


def test_default_marker_is_the_rarest_repeated_kernel():
    events = tk.gpu_events(_trace())
    events.append(_kernel("once", 1000, 1))
    assert tk.default_marker(events) in ("small", "head")  # 3 each; "gemv" runs 6 times
    with pytest.raises(ValueError, match="marker"):
        tk.default_marker([_kernel("once", 0, 1)])
    with pytest.raises(ValueError, match="marker"):
        tk.kernel_table(events, "once")


def test_main_reads_a_gzipped_trace_and_writes_json(tmp_path, capsys):
    path = tmp_path / "busy.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(4), f)
    out = tmp_path / "k.json"
    assert tk.main([str(path), "--marker", "head", "--output", str(out)]) == 0
    assert "3 steps between 'head' kernels, 100.0 us a step" in capsys.readouterr().out
    assert json.loads(out.read_text())["num_steps"] == 3


def _layered_trace(num_steps=2, num_layers=4):
    """Steps of an embedding copy, layers of norm (1 us), q/k/v GEMV (10), attention
    launched early (starts 2 us into the GEMV, ends 3 us after it) and o GEMV (6, the
    q/k/v GEMV's grid), then the final norm and the head (20)."""
    events, t = [], 0.0
    for _ in range(num_steps):
        events.append(_kernel("embed", t, 2))
        t += 2
        for _ in range(num_layers):
            events += [_kernel("norm", t, 1), _kernel("gemv", t + 1, 10, (64, 1, 1)),
                       _kernel("attn", t + 3, 11), _kernel("gemv", t + 14, 6, (64, 1, 1))]
            t += 20
        events += [_kernel("norm", t, 1), _kernel("head", t + 1, 20)]
        t += 21
    return {"traceEvents": events}


def test_layer_table_times_each_position_of_the_repeating_block():
    events = tk.gpu_events(_layered_trace())
    assert tk.layer_period([tk._key(e) for e in events]) == 4
    table = tk.layer_table(events)
    assert table["period"] == 4
    rows = [(p["name"], p["count"], p["own_us_mean"], p["end_to_end_us_mean"])
            for p in table["positions"]]
    # The q/k/v and o GEMVs share a grid but are told apart by their position; attention
    # counts 3 us end to end (from the GEMV's end), not its 11 us span.
    assert rows == [("norm", 8, 1, 1), ("gemv", 8, 10, 10), ("attn", 8, 11, 3),
                    ("gemv", 8, 6, 6)]
    assert table["end_to_end_us_per_block"] == 20
    assert tk.layer_table(events, period=8)["period"] == 8  # given, not found
    with pytest.raises(ValueError, match="repeats"):
        tk.layer_period([("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")])


def test_main_prints_the_layer_table(tmp_path, capsys):
    path = tmp_path / "busy.json"
    path.write_text(json.dumps(_layered_trace(3)))
    out = tmp_path / "k.json"
    assert tk.main([str(path), "--marker", "head", "--layers", "--output", str(out)]) == 0
    assert "blocks of 4 kernels, 20.00 us end to end each" in capsys.readouterr().out
    assert json.loads(out.read_text())["layers"]["period"] == 4
