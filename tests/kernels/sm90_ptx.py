"""Compile a Gluon or Triton kernel for sm_90 without a GPU and read its PTX: the tests'
process runs Triton's interpreter, so the compile runs in a process of its own."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

_COMPILE = """
import inspect, json, sys
import importlib
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

spec = json.loads(sys.argv[1])
module = importlib.import_module(spec["module"])
fn = getattr(module, spec["kernel"])
args = spec["layouts_arg"]
layouts = getattr(module, "_layouts")(*args if isinstance(args, list) else [args])
constexprs = dict(spec["constexprs"], **layouts)
names = list(inspect.signature(fn.fn).parameters)
signature = {n: "constexpr" if n in constexprs else spec["pointers"].get(
    n, "fp32" if n in spec["floats"] else "i32") for n in names}
for n, (shape, block, dtype) in spec["descriptors"].items():
    t = torch.empty(shape, dtype=getattr(torch, dtype))
    signature[n] = mangle_type(module.TensorDescriptor(t, list(shape), [shape[1], 1], block,
                                                       layouts["SMEM"]))
aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
           if n.endswith("_ptr") or n.startswith("stride") or n in spec["aligned"]}
source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
if spec["sass"]:
    sys.stdout.write(json.dumps(dict(ptx=kernel.asm["ptx"], sass=kernel.asm["sass"])))
else:
    sys.stdout.write(kernel.asm["ptx"])
"""


def compile_for_sm90(module: str, kernel: str, layouts_arg: int | list,
                     pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                     aligned: tuple[str, ...] = (), descriptors: dict | None = None,
                     options: dict | None = None, sass: bool = False) -> str | tuple[str, str]:
    """PTX of ``module.kernel`` for sm_90 with ``constexprs`` plus ``module._layouts(
    layouts_arg)`` (a list: its arguments); pointer arguments typed by ``pointers``,
    ``floats`` float32, the rest int32; pointers, strides and ``aligned`` integers
    16-divisible. ``descriptors``: TMA descriptor arguments as ``{name: (2-d shape, block
    shape, torch dtype name)}``, laid out as the layouts' ``SMEM``; ``options``: the
    compile's (default one warp). With ``sass``: the PTX and the machine code ptxas made
    of it (as cuobjdump prints it)."""
    spec = dict(module=module, kernel=kernel, layouts_arg=layouts_arg, pointers=pointers,
                constexprs=constexprs, floats=list(floats), aligned=list(aligned),
                descriptors=descriptors or {}, options=options or {"num_warps": 1},
                sass=sass)
    out = _compile_in_child(_COMPILE, spec)
    if not sass:
        return out
    both = json.loads(out)
    return both["ptx"], both["sass"]


_COMPILE_TRITON = """
import inspect, importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
names = list(inspect.signature(fn.fn).parameters)
signature = {n: "constexpr" if n in spec["constexprs"] else spec["types"].get(n, "i32")
             for n in names}
aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
           if n.endswith("_ptr") or n in spec["aligned"]}
source = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"], attrs=aligned)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
assert kernel.asm["cubin"]  # ptxas took the PTX, inline assembly included
sys.stdout.write(kernel.asm["ptx"])
"""


def compile_triton_for_sm90(module: str, kernel: str, types: dict[str, str],
                            constexprs: dict, aligned: tuple[str, ...] = (),
                            options: dict | None = None) -> str:
    """PTX of the Triton kernel ``module.kernel`` for sm_90 (ptxas run on it too), in a
    process of its own; ``types`` the non-int32 arguments' Triton types (``*bf16``,
    ``fp32``), pointers and ``aligned`` integers 16-divisible."""
    spec = dict(module=module, kernel=kernel, types=types, constexprs=constexprs,
                aligned=list(aligned), options=options or {"num_warps": 4})
    return _compile_in_child(_COMPILE_TRITON, spec)


def _compile_in_child(script: str, spec: dict) -> str:
    """Run a compile ``script`` on ``spec`` in a child process without Triton's
    interpreter and with a cache of its own (removed after); its stdout, the PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90-ptx-")
    try:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=300,
                              cwd=pathlib.Path(__file__).resolve().parents[2])
    finally:
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def loop_body(ptx: str, marker: str = "mma.sync") -> str:
    """The first PTX loop that holds ``marker`` (the MMAs by default), from its label to its
    backward branch."""
    lines = ptx.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines)
              if re.match(r"^\$L__BB\d+_\d+:", line)}
    for j, line in enumerate(lines):
        branch = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and labels.get(branch.group(1), j) < j:
            body = lines[labels[branch.group(1)]:j]
            if any(marker in b for b in body):
                return "\n".join(body)
    raise AssertionError(f"no loop with {marker} in the PTX")


def sass_loop(sass: str, marker: str) -> list[str]:
    """The instructions of the first machine-code loop (Triton's SASS listing: ``LBBn:``
    labels, a backward ``BRA``) holding an instruction that starts with ``marker``,
    predicates dropped."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        if re.match(r"^LBB\d+:", line):
            labels[line.rstrip(":")] = len(instructions)
            continue
        found = re.match(r"^\S+\t(.*?);", line)
        if found:
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", found.group(1).strip()))
    for j, text in enumerate(instructions):
        branch = re.match(r"BRA\s+(LBB\d+)", text)
        start = labels.get(branch.group(1), j) if branch else j
        if start < j and any(t.startswith(marker) for t in instructions[start:j]):
            return instructions[start:j + 1]
    raise AssertionError(f"no loop with {marker} in the SASS")
