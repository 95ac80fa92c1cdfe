"""``benchmarks/switch_ab.py``: windows of engine steps in turns with a switch on and off."""

from __future__ import annotations

import pytest

import benchmarks.switch_ab as ab
import kernels._launch


def test_turns_alternate_and_flip_the_first_side_each_round():
    assert ab.turns(3) == [True, False, False, True, True, False]
    order = ab.turns(8)
    assert order.count(True) == order.count(False) == 8
    assert sum(order[2 * r] for r in range(8)) == 4  # each side first in half the rounds


@pytest.mark.parametrize("name,match", [
    ("DIRECT_LAUNCH", "module.ATTRIBUTE"),
    ("kernels._no_such_module.X", "cannot import"),
    ("kernels._launch.NO_SUCH_SWITCH", "no attribute 'NO_SUCH_SWITCH'"),
])
def test_bad_switch_names_the_field(name, match):
    with pytest.raises(ValueError, match=f"switch.*{match}|{match}"):
        ab.resolve_switch(name)


def test_prompt_steps_past_the_prompts_are_refused():
    with pytest.raises(ValueError, match="prompt steps"):
        ab.switch_ab("kernels._launch.DIRECT_LAUNCH", "random:tiny", 1, 64, 16, 2, 2)


def test_each_window_runs_real_steps_with_its_side_set(monkeypatch):
    seen = []
    run_steps = ab._run_steps

    def recorded(engine, num_steps):
        seen.append(kernels._launch.DIRECT_LAUNCH)
        return run_steps(engine, num_steps)

    monkeypatch.setattr(ab, "_run_steps", recorded)
    default = kernels._launch.DIRECT_LAUNCH
    result = ab.switch_ab("kernels._launch.DIRECT_LAUNCH", "random:tiny", 2, 32, 8, 1, 3)
    assert seen == ab.turns(3)
    assert kernels._launch.DIRECT_LAUNCH == default  # restored
    for side in ("on", "off"):
        windows = result[side]["windows_ms_per_step"]
        assert len(windows) == 3 and all(w > 0 for w in windows)
        assert result[side]["min_ms_per_step"] <= result[side]["median_ms_per_step"]
    assert result["on_over_off"] == pytest.approx(
        result["on"]["median_ms_per_step"] / result["off"]["median_ms_per_step"])
