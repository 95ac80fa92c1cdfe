"""benchmarks/block_reservation.py on a few prompts: it runs both modes, every request stops at
its drawn length, and the JSON carries the table."""

import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "block_reservation.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("block_reservation_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_is_seeded_and_template_lengths_stay_in_range():
    bench = load_bench()
    first = bench.make_workload(40, 512, 3, seed=1, round_index=0)
    assert first == bench.make_workload(40, 512, 3, seed=1, round_index=0)
    second = bench.make_workload(40, 512, 3, seed=1, round_index=1)
    assert first != second
    prefixes = {tuple(p[:bench.TEMPLATE_LEN]) for p, _ in first + second}
    assert len(prefixes) == len(bench.TEMPLATES)  # rounds share the templates
    assert all(3 not in p for p, _ in first)  # the stop token never appears in a prompt
    lo, hi = min(r[0] for _, r in bench.TEMPLATES), max(r[1] for _, r in bench.TEMPLATES)
    assert all(lo <= n <= hi for _, n in first)


def test_both_modes_run_and_stop_at_the_drawn_lengths(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "r.json"
    # run_mode raises if a request does not stop at its drawn length.
    assert bench.main(["--num-prompts", "12", "--rounds", "2", "--repeats", "1",
                       "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["round"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1), ("none", 2), ("predicted", 1), ("predicted", 2)}
    assert result["num_kv_blocks"] < result["working_set_blocks"]
    for row in rows.values():
        assert row["output_tokens"] > 0 and row["steps"] > 0
    assert "preemptions" in capsys.readouterr().out
