"""The image's entrypoint: a model that cannot load stops the container with one clear line;
compose's worker replicas each claim a GPU of their own; the command is exec'd unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gridllm import entrypoint
from gridllm.common import presets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_dir(path, weights: str | None = "model.safetensors") -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if weights:
        (path / weights).write_bytes(b"\0")
    return str(path)


def _gguf(path, head: bytes = b"GGUF\x03\x00\x00\x00") -> str:
    path.write_bytes(head + b"\0" * 16)
    return str(path)


@pytest.mark.parametrize("argv, model", [
    (["python", "-m", "worker_svc", "--model", "/models/a", "--port", "1"], "/models/a"),
    (["python", "-m", "router", "--model=/m/b.gguf"], "/m/b.gguf"),
    (["python", "-m", "scheduler_svc", "--port", "50052"], None),
    (["gridllm", "up", "--model"], None),
])
def test_model_arg(argv, model):
    assert entrypoint.model_arg(argv) == model


def test_loadable_models_pass(tmp_path):
    entrypoint.check_model(_hf_dir(tmp_path / "hf"))
    entrypoint.check_model(_hf_dir(tmp_path / "hf-bin", "pytorch_model.bin"))
    entrypoint.check_model(_gguf(tmp_path / "m.gguf"))
    entrypoint.check_model("random:tiny")
    entrypoint.check_model("random:qwen3-0.6b")


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "neither a preset nor an existing path"),
    (lambda p: _hf_dir(p / "noweights", weights=None), "no *.safetensors"),
    (lambda p: (p / "nocfg").mkdir() or str(p / "nocfg"), "without config.json"),
    (lambda p: _gguf(p / "pointer.gguf", b"version https://git-lfs"), "not a GGUF file"),
    (lambda p: _gguf(p / "model.bin"), "not a GGUF file"),
    (lambda p: "random:nope", "did you mean 'random:tiny'?"),
    (lambda p: "", "empty"),
])
def test_unloadable_models_are_named_with_the_way_out(tmp_path, make, message):
    name = make(tmp_path)
    with pytest.raises(ValueError) as error:
        entrypoint.check_model(name)
    assert message in str(error.value)
    if name:
        assert repr(name) in str(error.value)


def test_a_missing_model_lists_what_is_there(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(ValueError, match=r"is empty \(is the models volume mounted\?\)"):
        entrypoint.check_model(str(models / "Qwen3-0.6B"))
    _hf_dir(models / "Qwen3-0.6B")
    _gguf(models / "SmolLM2.gguf")
    with pytest.raises(ValueError) as error:
        entrypoint.check_model(str(models / "qwen3-0.6b"))
    assert f"{models} holds: Qwen3-0.6B, SmolLM2.gguf" in str(error.value)
    # A bare name is looked for in the models directory's listing.
    with pytest.raises(ValueError, match="smollm2-135m.*holds: Qwen3-0.6B"):
        entrypoint.check_model("Qwen3", models_dir=str(models))
    with pytest.raises(ValueError, match="does not exist"):
        entrypoint.check_model("/nowhere/x", models_dir=str(models))


def test_presets_need_their_file(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(presets.PRESETS, "absent-model", presets.GGUFPreset(
        "llm-absent", "0.1", "llm_absent_pkg", "x.gguf", "0" * 64))
    with pytest.raises(ValueError, match="python -m gridllm.common.presets absent-model"):
        entrypoint.check_model("absent-model")


def test_gpu_claims_are_exclusive_and_released(tmp_path):
    lock_dir = str(tmp_path / "locks")
    first, first_fd = entrypoint.claim_gpu(lock_dir, 2)
    second, second_fd = entrypoint.claim_gpu(lock_dir, 2)
    assert (first, second) == (0, 1)
    with pytest.raises(RuntimeError, match="all 2 GPUs are claimed.*at most 2"):
        entrypoint.claim_gpu(lock_dir, 2)
    os.close(first_fd)
    again, again_fd = entrypoint.claim_gpu(lock_dir, 2)
    assert again == 0
    for fd in (second_fd, again_fd):
        os.close(fd)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        entrypoint.claim_gpu(lock_dir, 0)


def test_tensor_parallel_claims_take_every_gpu_or_none(tmp_path):
    lock_dir = str(tmp_path / "locks")
    single, single_fd = entrypoint.claim_gpu(lock_dir, 4)
    pair, pair_fds = entrypoint.claim_gpus(lock_dir, 4, 2)
    assert (single, pair) == (0, [1, 2])
    with pytest.raises(RuntimeError, match=r"2 GPUs needed \(--tensor-parallel-size 2\) "
                                           r"but only 1 of 4 are free.*at most 2"):
        entrypoint.claim_gpus(lock_dir, 4, 2)
    # The refused claim let go of the GPU it had locked.
    last, last_fd = entrypoint.claim_gpu(lock_dir, 4)
    assert last == 3
    for fd in (single_fd, *pair_fds, last_fd):
        os.close(fd)


@pytest.mark.parametrize(("argv", "count"), [
    (["python", "-m", "worker_svc"], 1),
    (["python", "-m", "worker_svc", "--tensor-parallel-size", "4"], 4),
    (["python", "-m", "worker_svc", "--tensor-parallel-size=2"], 2),
])
def test_num_gpus_arg(argv, count):
    assert entrypoint.num_gpus_arg(argv) == count


def test_a_bad_tensor_parallel_size_is_named():
    with pytest.raises(ValueError, match="--tensor-parallel-size: expected a count"):
        entrypoint.num_gpus_arg(["--tensor-parallel-size", "two"])


def test_count_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("GRIDLLM_NUM_GPUS", raising=False)
    for name in ("nvidia0", "nvidia1", "nvidia3", "nvidiactl", "nvidia-uvm", "null"):
        (tmp_path / name).touch()
    assert entrypoint.count_gpus(str(tmp_path)) == 3
    monkeypatch.setenv("GRIDLLM_NUM_GPUS", "8")
    assert entrypoint.count_gpus(str(tmp_path)) == 8
    monkeypatch.setenv("GRIDLLM_NUM_GPUS", "eight")
    with pytest.raises(ValueError, match="GRIDLLM_NUM_GPUS"):
        entrypoint.count_gpus(str(tmp_path))


# ----------------------------------------------------------------------- as a process
_REPORT = ("import os, sys; print(os.getpid(), os.environ.get('CUDA_VISIBLE_DEVICES'), "
           "flush=True); sys.stdin.read()")


def _start(env: dict[str, str], *command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gridllm.entrypoint", *command], cwd=ROOT,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GRIDLLM_") and k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = ROOT
    return {**env, **extra}


def test_replicas_get_one_gpu_each_for_as_long_as_they_run(tmp_path):
    env = _env(GRIDLLM_GPU_LOCK_DIR=str(tmp_path / "locks"), GRIDLLM_NUM_GPUS="2")
    children = []
    try:
        seen = []
        for _ in range(2):
            child = _start(env, sys.executable, "-c", _REPORT)
            children.append(child)
            pid, gpu = child.stdout.readline().split()
            # exec'd: the command is the entrypoint's own process (signals reach it).
            assert int(pid) == child.pid
            seen.append(gpu)
        assert sorted(seen) == ["0", "1"]
        third = _start(env, sys.executable, "-c", _REPORT)
        _, err = third.communicate(timeout=60)
        assert third.returncode == entrypoint.EXIT_CONFIG_ERROR
        assert "all 2 GPUs are claimed" in err
        # A replica that exits frees its GPU for the next one.
        children[0].communicate("", timeout=60)
        fourth = _start(env, sys.executable, "-c", _REPORT)
        children.append(fourth)
        assert fourth.stdout.readline().split()[1] == seen[0]
        # An explicit CUDA_VISIBLE_DEVICES wins and claims nothing.
        pinned = _start({**env, "CUDA_VISIBLE_DEVICES": "5"}, sys.executable, "-c", _REPORT)
        children.append(pinned)
        assert pinned.stdout.readline().split()[1] == "5"
    finally:
        for child in children:
            if child.poll() is None:
                child.communicate("", timeout=60)


def test_a_tensor_parallel_replica_gets_as_many_gpus_as_ranks(tmp_path):
    env = _env(GRIDLLM_GPU_LOCK_DIR=str(tmp_path / "locks"), GRIDLLM_NUM_GPUS="3")
    children = []
    try:
        pair = _start(env, sys.executable, "-c", _REPORT, "--tensor-parallel-size", "2")
        children.append(pair)
        assert pair.stdout.readline().split()[1] == "0,1"
        refused = _start(env, sys.executable, "-c", _REPORT, "--tensor-parallel-size", "2")
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == entrypoint.EXIT_CONFIG_ERROR
        assert "2 GPUs needed (--tensor-parallel-size 2) but only 1 of 3 are free" in err
        single = _start(env, sys.executable, "-c", _REPORT)
        children.append(single)
        assert single.stdout.readline().split()[1] == "2"
    finally:
        for child in children:
            if child.poll() is None:
                child.communicate("", timeout=60)


def test_a_bad_model_stops_before_the_command_runs(tmp_path):
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.gguf").write_bytes(b"GGUF")
    child = _start(_env(GRIDLLM_MODELS_DIR=str(models)), sys.executable, "-c",
                   f"open({str(marker)!r}, 'w')", "--model", str(models / "typo.gguf"))
    _, err = child.communicate("", timeout=60)
    assert child.returncode == entrypoint.EXIT_CONFIG_ERROR
    assert not marker.exists()
    assert "typo.gguf" in err and "holds: other.gguf" in err
    ok = _start(_env(), sys.executable, "-c", f"open({str(marker)!r}, 'w')",
                "--model", str(models / "other.gguf"))
    ok.communicate("", timeout=60)
    assert ok.returncode == 0 and marker.exists()
