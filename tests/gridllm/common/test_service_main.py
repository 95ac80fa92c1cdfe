"""gridllm.common.service_main: a bad flag value is a one-line usage error naming the field."""

from __future__ import annotations

import pytest

import router.__main__ as router_main
import scheduler_svc.__main__ as scheduler_main
import worker_svc.__main__ as worker_main


@pytest.mark.parametrize("main, argv, message", [
    (scheduler_main.main, ["--port", "70000"], "port must be in [0, 65535], got 70000."),
    (scheduler_main.main, ["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
    (worker_main.main, ["--model", "m", "--heartbeat-ttl", "0.5"],
     "heartbeat_ttl must be at least 1 second"),
    (worker_main.main, ["--model", "m", "--gpu-memory-utilization", "2"],
     "gpu_memory_utilization must be in (0, 1]"),
    (worker_main.main, ["--model", "m", "--tensor-parallel-size", "0"],
     "tensor_parallel_size must be an integer of at least 1"),
    # Checked before the model loads (random:tiny has 4 attention heads).
    (worker_main.main, ["--model", "random:tiny", "--device", "cpu",
                        "--tensor-parallel-size", "3"],
     "tensor_parallel_size must divide the model's 4 attention heads, got 3."),
    (router_main.main, ["--model", "m"], "scheduler_addresses or redis_url must be given"),
])
def test_bad_value_is_a_usage_error(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m ")


def test_every_service_has_grace_and_log_level_with_defaults_shown(capsys):
    for module, grace in ((router_main, "10.0"), (scheduler_main, "5.0"), (worker_main, "5.0")):
        text = " ".join(module.build_parser().format_help().split())
        assert f"--grace S seconds to drain in-flight calls on SIGTERM (default: {grace})" \
            in text
        assert "--log-level" in text


def test_startup_objects_leave_the_collectors_full_collections(monkeypatch):
    import gc

    from gridllm.common import heap
    from gridllm.common.heap import GC_GEN0_THRESHOLD, freeze_startup_objects

    monkeypatch.setattr(heap, "_frozen_for_life", False)  # restored after the test
    threshold = gc.get_threshold()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
