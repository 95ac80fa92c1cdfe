"""Host time of the attention calls that prompt steps run eagerly (between the pieces of
the graphs cut at attention), and how much of it is Triton's launch path: each served call
(its step's plans kept, as for a step's layers, and built anew on every call), then each
Triton launch it makes, through ``kernel[grid](...)`` and through
``kernels._launch.Launcher`` (the compiled kernel's own launcher after the Launcher's
checks: no argument binding, specialization key or cache lookup; nan for a kernel of TMA
descriptors, whose arguments that launcher does not take as given).

Cases: a short prompt chunk after a cached context (the chunk kernel and its merge) and a
mixed step (a prompt chunk among one-token requests: the decode kernel in place, then the
Gluon kernel or the Triton prefill kernel). Host us a call with the GPU kept busy (no
launch waits on it), the step's plans kept (as served) and built on every call; a
cProfile of each served call follows.

Usage: ``python benchmarks/launch_host.py [--calls 200] [--unplanned-calls 20]
[--output FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.chunk_attention import HEAD_DIM, _args, chunk_batch  # noqa: E402
from benchmarks.prefill_mixed import host_ms, mixed_batch, profile_host  # noqa: E402


def host_us(fn, calls: int) -> float:
    """Host us per call of ``fn``, the GPU kept busy so that no launch waits on it."""
    return 1e3 * host_ms(fn, calls)


def record_launches(fn) -> list:
    """``(jit_function, grid, args, kwargs)`` of every Triton launch one call of ``fn``
    makes."""
    from triton.runtime.jit import JITFunction

    launches = []
    classes = {JITFunction}
    try:
        from triton.experimental.gluon._runtime import GluonJITFunction
        classes.add(GluonJITFunction)
    except ImportError:
        pass
    saved = {cls: cls.__dict__.get("run") for cls in classes}

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                launches.append((self, grid, args, dict(kwargs)))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run
    for cls, original in saved.items():
        if original is not None:
            cls.run = wrap(original)
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        for cls, original in saved.items():
            if original is not None:
                cls.run = original
    return launches


def direct(jit_fn, grid, args: tuple, kwargs: dict):
    """The launch through a ``kernels._launch.Launcher`` switched on, after its first
    launch: the compiled variant's own launcher, no launch metadata or hooks (None where
    the Launcher keeps to ``kernel[grid]``: TMA descriptors and the like)."""
    from kernels import _launch

    switch, _launch.DIRECT_LAUNCH = _launch.DIRECT_LAUNCH, True
    try:
        launcher = _launch.Launcher(jit_fn, **kwargs)
    finally:
        _launch.DIRECT_LAUNCH = switch
    launcher(grid, *args)
    if launcher._kernel is None:
        return None
    return lambda: launcher(grid, *args)


@contextlib.contextmanager
def launch_hooks(enter, exit_):
    """Triton's launch hooks (``knobs.runtime``) set to these within."""
    from triton import knobs

    saved = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook = enter, exit_
    try:
        yield
    finally:
        knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook = saved


def hooks_description() -> str:
    from triton import knobs

    return ", ".join(f"{name} {getattr(knobs.runtime, name)!r}"
                     f"{f' ({len(h.calls)} calls)' if hasattr(h, 'calls') else ''}"
                     for name in ("launch_enter_hook", "launch_exit_hook")
                     for h in [getattr(knobs.runtime, name)])


def cases() -> dict:
    """Each case's call, taking the step's ``batch_cache`` (None: the plans built anew on
    every call, as without a step)."""
    from kernels.prefill_attention import prefill_attention

    scale = HEAD_DIM ** -0.5
    out = {}
    for chunk, context in ((16, 1024), (64, 4096)):
        a = _args(chunk_batch(chunk, context, torch.bfloat16))
        out[f"chunk {chunk} after {context} keys"] = (
            lambda cache, a=a, c=chunk, s=context + chunk: prefill_attention(
                *a, scale, max_query_len=c, batch_cache=cache, split_one_token=False,
                max_seq_len=s))
    for chunk, decodes in ((64, 8), (256, 64), (2048, 200)):
        b = mixed_batch(chunk, decodes, 1000, 16, torch.bfloat16, decodes_first=True)
        a = [b[k] for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                            "query_start_loc")]
        out[f"mixed: chunk {chunk} + {decodes} one-token of 1000"] = (
            lambda cache, a=a, c=chunk, d=decodes: prefill_attention(
                *a, scale, max_query_len=c, batch_cache=cache, one_token_prefix=d,
                max_seq_len=max(c, 1000)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--unplanned-calls", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/launch_host.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}: host us a call (GPU kept busy); Triton's "
          f"{hooks_description()}")
    results = {}
    for name, call in cases().items():
        cache: dict = {}
        fn = lambda call=call, cache=cache: call(cache)  # noqa: E731
        # Built anew, a call launches the plans' small torch ops too (~20 kernels): few
        # calls, or the launch queue fills behind the busy GPU and the host waits on it.
        row = {"served": host_us(fn, args.calls), "launches": [],
               "unplanned": host_us(lambda call=call: call(None), args.unplanned_calls)}
        with launch_hooks(None, None):
            row["served_no_hooks"] = host_us(fn, args.calls)
        print(f"  {name}: served call {row['served']:.1f} (plans built on every call: "
              f"{row['unplanned']:.1f}; launch hooks None: {row['served_no_hooks']:.1f})")
        for jit_fn, grid, kargs, kwargs in record_launches(fn):
            kname = getattr(jit_fn, "__name__", str(jit_fn))
            jit_us = host_us(lambda j=jit_fn, g=grid, a=kargs, k=kwargs: j[g](*a, **k),
                             args.calls)
            with launch_hooks(None, None):
                jit_no_hooks_us = host_us(
                    lambda j=jit_fn, g=grid, a=kargs, k=kwargs: j[g](*a, **k), args.calls)
            launch = direct(jit_fn, grid, kargs, kwargs)
            direct_us = float("nan") if launch is None else host_us(launch, args.calls)
            print(f"    {kname:40s} kernel[grid] {jit_us:7.1f}  hooks None "
                  f"{jit_no_hooks_us:7.1f}  direct {direct_us:7.1f}")
            row["launches"].append(dict(kernel=kname, jit_us=jit_us,
                                        jit_no_hooks_us=jit_no_hooks_us,
                                        direct_us=direct_us))
        if args.profile:
            profile_host(fn, 100, name)
        results[name] = row
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args),
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
