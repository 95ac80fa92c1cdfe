"""Launches of one compiled Triton kernel without Triton's per-call launch path.

``kernel[grid](*args)`` binds the arguments, derives the specialization key (each tensor's
dtype and 16-byte alignment, each integer's value class), looks the compiled variant up and
only then launches it: tens of microseconds of Python a launch, paid on every layer of the
steps that run attention eagerly (between the pieces of the graphs cut at attention), where
the host is what bounds a short step. A ``Launcher`` makes the first launch through that
path, keeps the compiled variant it returned, and hands the next launches' arguments
straight to the variant's own launcher, after checking that nothing the variant was
specialized on has changed: the integer arguments' values (a step's strides, sizes and
flags are its layers' too), the tensors' dtypes and, for tensors that were 16-byte
aligned, that they still are (a variant compiled for aligned pointers must not get an
unaligned one; the converse is safe). Anything else (another variant, a Triton whose
launcher takes other arguments, launch hooks set for a profiler, the CPU interpreter)
goes through ``kernel[grid]`` as before. Launch hooks count as set only where a chain
holds one: Triton 3.4+ keeps an empty ``HookChain`` there, never None.

H100, Triton 3.6, host us a launch with the GPU kept busy (``benchmarks/launch_host.py``):
``kernel[grid]`` 13-29, the compiled kernel's launcher 5-6 (the chunk kernel 21.6 against
6.2, the decode kernel 23.8 against 5.6). End to end, 64-token prompt steps of a 28-layer
model whose host bounds them (random:qwen3-0.6b, ``benchmarks/switch_ab.py``, windows of
steps in turns in one process) took 16-22% less time with direct launches; those of
Llama-3-8B, whose kernels are 93% of the step, the same. On by default;
``GRIDLLM_DIRECT_LAUNCH=0`` sends every launch through ``kernel[grid]``.
"""

from __future__ import annotations

import operator

import torch

from kernels._utils import env_switch, is_interpreter

DIRECT_LAUNCH = env_switch("GRIDLLM_DIRECT_LAUNCH")

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - a Triton without knobs: no hooks to honour
    _knobs = None
try:
    from triton.runtime.driver import driver as _driver
except ImportError:  # pragma: no cover
    _driver = None


def _launchable(args: tuple) -> bool:
    """Whether launches with these arguments may skip ``kernel[grid]``: a CUDA tensor
    first (its device is the launch's), not the interpreter."""
    return (_driver is not None and not is_interpreter() and bool(args)
            and isinstance(args[0], torch.Tensor) and args[0].is_cuda)


def _stream(device: int):
    return _driver.active.get_current_stream(device)


def _hook_set(hook) -> bool:
    """Whether a launch hook would run: Triton 3.4+ keeps a ``HookChain`` there, never
    None, empty unless a profiler adds to it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    runtime = getattr(_knobs, "runtime", None)
    return runtime is not None and (_hook_set(getattr(runtime, "launch_enter_hook", None))
                                    or _hook_set(getattr(runtime, "launch_exit_hook", None)))


class Launcher:
    """Launches of ``jit_fn`` whose positional arguments are its runtime parameters, in
    order, and whose keyword arguments (its constexprs and launch options) are fixed at
    construction. Call it as ``launcher(grid, *args)``; it returns what ``kernel[grid]``
    does on the first call and ``None`` after."""

    def __init__(self, jit_fn, **kwargs) -> None:
        self.jit_fn = jit_fn
        self.kwargs = kwargs
        self._kernel = None  # the compiled variant, once a direct launch may follow
        self._tail: tuple = ()  # the constexpr parameters' values, after the runtime ones
        self._ints = None  # itemgetter of the integer arguments, and their values
        self._int_values: object = None
        # (index, dtype, whether it was 16-byte aligned) of each tensor argument.
        self._tensors: tuple[tuple[int, torch.dtype, bool], ...] = ()
        self._broken = not DIRECT_LAUNCH

    def _same_variant(self, args: tuple) -> bool:
        """Whether the adopted variant takes ``args``: integers equal, dtypes equal, the
        tensors that were 16-byte aligned still so (one loop: a layer's launch checks
        this each time)."""
        if self._ints is not None and self._ints(args) != self._int_values:
            return False
        for i, dtype, aligned in self._tensors:
            t = args[i]
            if t.dtype is not dtype or (aligned and t.data_ptr() & 15):
                return False
        return True

    def __call__(self, grid: tuple, *args):
        kernel = self._kernel
        if kernel is not None and not _hooks_set():
            if self._same_variant(args):
                device = args[0].device.index
                try:
                    kernel.run(grid[0], grid[1] if len(grid) > 1 else 1,
                               grid[2] if len(grid) > 2 else 1,
                               _stream(device), kernel.function,
                               kernel.packed_metadata, None, None, None, *args, *self._tail)
                    return None
                except TypeError:  # another Triton's launcher: keep to kernel[grid]
                    self._kernel, self._broken = None, True
        compiled = self.jit_fn[grid](*args, **self.kwargs)
        if self._kernel is None and not self._broken:
            self._adopt(compiled, args)
        return compiled

    def _adopt(self, compiled, args: tuple) -> None:
        if (compiled is None or not _launchable(args) or not hasattr(compiled, "run")
                or not hasattr(compiled, "packed_metadata")):
            self._broken = True
            return
        params = getattr(self.jit_fn, "params", None)
        if params is None or len(params) < len(args):
            self._broken = True
            return
        if any(not isinstance(a, (torch.Tensor, int, float)) and a is not None
               for a in args):
            self._broken = True  # descriptors and the like: their specialization is theirs
            return
        tail = []
        for param in params[len(args):]:
            if param.name in self.kwargs:
                tail.append(self.kwargs[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                self._broken = True
                return
        ints = [i for i, a in enumerate(args) if isinstance(a, int) or a is None]
        self._ints = operator.itemgetter(*ints) if ints else None
        self._int_values = self._ints(args) if ints else None
        self._tensors = tuple((i, a.dtype, a.data_ptr() % 16 == 0) for i, a in enumerate(args)
                              if isinstance(a, torch.Tensor))
        self._tail = tuple(tail)
        self._kernel = compiled
