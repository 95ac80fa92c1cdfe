"""benchmarks/step_periods.py on a tiny model: every step is timed, the windows cover them,
the host and the wait never exceed the step, a full collection is attributed to its step,
and the engine is left as it was."""

import gc
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "step_periods.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("step_periods_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_every_step_is_timed_and_the_windows_cover_them(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "r.json"
    assert bench.main(["--model", "random:tiny", "--device", "cpu", "--num-prompts", "6",
                       "--input-len", "9", "--output-len", "70", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["output_tokens_per_s"] > 0
    assert result["frozen_objects"] > 1000  # generate's steps run with the heap frozen
    # One prefill step, then a step per token (plus the pipeline's last read).
    assert 70 <= result["steps"] <= 75
    windows = result["windows"]
    assert [w["steps"] for w in windows][:2] == ["0-8", "8-64"]
    assert windows[-1]["steps"].endswith(f"-{result['steps'] - 1}")
    for w in windows:
        assert 0 <= w["launch_ms"] and 0 <= w["wait_ms"]
        assert w["launch_ms"] + w["wait_ms"] <= w["period_ms"] + 1e-6 <= w["max_period_ms"]
    assert "| 0-8 |" in capsys.readouterr().out


def test_a_full_collection_is_attributed_to_the_step_it_stalled():
    bench = load_bench()
    from gridllm.bench.throughput import ThroughputConfig, build_llm

    llm = build_llm(ThroughputConfig(model="random:tiny", device="cpu", max_num_seqs=4))
    timeline = bench.Timeline()
    remove = bench.observe(llm, timeline)
    try:
        step = llm.engine.step

        def step_with_a_collection():
            if len(timeline.starts) == 3:
                gc.collect()
            return step()

        llm.engine.step = step_with_a_collection
        from gridllm.common.sampling_params import SamplingParams

        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
        llm.engine.step = step
    finally:
        remove()
    assert [i for i, _ in timeline.full_collections] == [3]
    assert len(timeline.starts) == len(timeline.launch_s) == len(timeline.wait_s) >= 8
    # The wrappers are gone: the class's own methods serve again.
    assert "step" not in vars(llm.engine)
    assert "execute_model_async" not in vars(llm.engine.runner)


def test_bad_counts_are_usage_errors():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--model", "random:tiny", "--num-prompts", "0"])
