"""``kernels._launch.Launcher``: which launches go straight to the compiled kernel and which
through ``kernel[grid]``, with a stand-in JIT function and compiled kernel that record
their calls (the real launch path is checked on the GPU through the chunk kernel's tests
and the model's greedy parity)."""

from __future__ import annotations

import pytest
import torch

from kernels import _launch


class _Param:
    def __init__(self, name: str, default=None, has_default: bool = False):
        self.name, self.default, self.has_default = name, default, has_default


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self, calls: list, error: type[Exception] | None = None):
        self.calls, self.error = calls, error

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_,
            *args):
        if self.error is not None:
            raise self.error("launcher signature")
        self.calls.append(("direct", (gx, gy, gz), args))


class _Jit:
    """A kernel ``(x_ptr, y_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = True)``."""
    params = [_Param("x_ptr"), _Param("y_ptr"), _Param("n"), _Param("scale"),
              _Param("BLOCK"), _Param("FLAG", True, has_default=True)]

    def __init__(self, error: type[Exception] | None = None):
        self.calls: list = []
        self.compiled = _Compiled(self.calls, error)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", tuple(grid), args))
            return self.compiled
        return launch


@pytest.fixture
def on_gpu(monkeypatch):
    """CPU tensors taken as launchable, so the launcher's choices can be seen here."""
    monkeypatch.setattr(_launch, "_launchable", lambda args: True)
    monkeypatch.setattr(_launch, "_stream", lambda device: 7)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)


def _tensors(dtype=torch.float32):
    return torch.zeros(64, dtype=dtype), torch.zeros(64, dtype=dtype)


def test_first_launch_through_the_jit_then_direct_with_the_constexprs(on_gpu):
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32, num_warps=4)
    x, y = _tensors()
    assert launcher((4,), x, y, 64, 0.5) is jit.compiled
    x2, y2 = _tensors()  # another layer's tensors, the same specialization
    assert launcher((4, 2), x2, y2, 64, 0.25) is None
    assert [c[0] for c in jit.calls] == ["jit", "direct"]
    # The grid padded to three dims; the constexprs after the runtime arguments, the
    # defaulted one included; launch options (num_warps) are not parameters.
    assert jit.calls[1][1] == (4, 2, 1)
    assert jit.calls[1][2] == (x2, y2, 64, 0.25, 32, True)


@pytest.mark.parametrize("change", ["int", "dtype", "unaligned"])
def test_a_changed_specialization_goes_through_the_jit(on_gpu, change):
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32)
    x, y = _tensors()
    launcher((1,), x, y, 64, 0.5)
    if change == "int":
        args = (x, y, 65, 0.5)
    elif change == "dtype":
        args = (x, y.to(torch.float16), 64, 0.5)
    else:  # 4 bytes past an aligned start
        args = (x[1:], y, 64, 0.5)
    launcher((1,), *args)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    launcher((1,), x, y, 64, 0.5)  # back to the first specialization
    assert jit.calls[-1][0] == "direct"


def test_unaligned_first_allows_aligned_later(on_gpu):
    """A variant compiled without the alignment assumption serves aligned pointers too."""
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32)
    x, y = _tensors()
    launcher((1,), x[1:], y, 64, 0.5)
    launcher((1,), x, y, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "direct"]


def test_another_launcher_signature_falls_back_for_good(on_gpu):
    jit = _Jit(error=TypeError)
    launcher = _launch.Launcher(jit, BLOCK=32)
    x, y = _tensors()
    for _ in range(3):
        launcher((1,), x, y, 64, 0.5)
    # The failed direct attempt records nothing; every launch went through the JIT.
    assert [c[0] for c in jit.calls] == ["jit"] * 3


def test_missing_constexpr_or_other_argument_kinds_keep_the_jit(on_gpu):
    x, y = _tensors()
    jit = _Jit()
    launcher = _launch.Launcher(jit)  # BLOCK neither given nor defaulted
    launcher((1,), x, y, 64, 0.5)
    launcher((1,), x, y, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32)
    descriptor = object()  # a TMA descriptor, say: its own specialization
    launcher((1,), x, descriptor, 64, 0.5)
    launcher((1,), x, descriptor, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]


def test_switched_off_hooks_set_or_off_the_gpu(on_gpu, monkeypatch):
    x, y = _tensors()
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", False)
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32)
    launcher((1,), x, y, 64, 0.5)
    launcher((1,), x, y, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
    jit = _Jit()
    launcher = _launch.Launcher(jit, BLOCK=32)
    launcher((1,), x, y, 64, 0.5)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)  # a profiler's launch hooks
    launcher((1,), x, y, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    monkeypatch.undo()
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
    jit = _Jit()  # CPU tensors, the real check: not launchable
    launcher = _launch.Launcher(jit, BLOCK=32)
    launcher((1,), x, y, 64, 0.5)
    launcher((1,), x, y, 64, 0.5)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]


def test_empty_hook_chains_are_no_hooks(monkeypatch):
    """Triton 3.4+ keeps an (empty) ``HookChain`` where a profiler's launch hooks go, never
    None: only a chain with calls, or another callable, counts as hooks set."""
    import types

    class _Chain:
        def __init__(self, calls):
            self.calls = calls

    def runtime(enter, exit_):
        return types.SimpleNamespace(runtime=types.SimpleNamespace(
            launch_enter_hook=enter, launch_exit_hook=exit_))

    monkeypatch.setattr(_launch, "_knobs", runtime(_Chain([]), _Chain([])))
    assert not _launch._hooks_set()
    monkeypatch.setattr(_launch, "_knobs", runtime(None, None))
    assert not _launch._hooks_set()
    monkeypatch.setattr(_launch, "_knobs", runtime(_Chain([]), _Chain([print])))
    assert _launch._hooks_set()
    monkeypatch.setattr(_launch, "_knobs", runtime(print, None))
    assert _launch._hooks_set()


def test_tritons_own_default_hooks_are_no_hooks():
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs"):
        pytest.skip("a Triton without knobs")
    assert not _launch._hooks_set()


@pytest.mark.parametrize("value,expected", [(None, True), ("0", False), ("1", True)])
def test_direct_launches_are_on_unless_switched_off(value, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRIDLLM_DIRECT_LAUNCH"}
    if value is not None:
        env["GRIDLLM_DIRECT_LAUNCH"] = value
    out = subprocess.run([sys.executable, "-c",
                          "import kernels._launch as m; print(m.DIRECT_LAUNCH)"],
                         env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == str(expected)
