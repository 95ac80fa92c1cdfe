"""Argument checks and launch helpers shared by the kernel launchers."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl

try:  # Grid dependency control, for programmatic dependent launch (Hopper and later).
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without it: launch_dependent_args never asks for it
    gdc_launch_dependents = gdc_wait = None

# Activation/KV dtypes every kernel accepts.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: object, *, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None, contiguous: bool = False,
                 last_dim_contiguous: bool = False) -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor as described."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}.")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}.")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}.")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}.")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}.")
    return t


def check_scale(name: str, scale: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``scale`` is a positive finite number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not 0 < scale < float("inf"):
        raise ValueError(f"{name} must be a positive float, got {scale!r}.")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t.shape == shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}.")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Read once, as Triton reads it when it decorates a kernel (the kernel modules import this
# one): the dispatch checks ask per call and per layer, where an environment lookup costs.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_interpreter() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when the
    kernels were imported)."""
    return _INTERPRET


# Column blocks a split-K launch may have (one counter each).
SPLIT_K_MAX_BLOCKS = 1 << 16
_SPLIT_K_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_k_counters(device: torch.device) -> torch.Tensor:
    """The device's split-K counters (``SPLIT_K_MAX_BLOCKS`` int32), zero between launches:
    the last program of a column block to finish adds the partial sums and resets its
    counter. Allocated at the first launch (a warm-up step), never inside a graph capture."""
    counters = _SPLIT_K_COUNTERS.get(device)
    if counters is None:
        counters = _SPLIT_K_COUNTERS[device] = torch.zeros(SPLIT_K_MAX_BLOCKS,
                                                           dtype=torch.int32, device=device)
    return counters


def split_k_workspace(split_k: int, rows: int, num_out: int, block_n: int,
                      unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partials, counters)`` of a launch that splits K ``split_k`` ways: float32 partial
    sums for ``rows`` planes of ``num_out`` per split, and the device's counters. One split:
    ``unused`` for both (the kernel compiles the split-K path out).

    Raises:
        ValueError: more column blocks of ``block_n`` than there are counters.
    """
    if split_k <= 1:
        return unused, unused
    if triton.cdiv(num_out, block_n) > SPLIT_K_MAX_BLOCKS:
        raise ValueError(f"weight has {num_out} rows: more than {SPLIT_K_MAX_BLOCKS} "
                         f"blocks of {block_n} for split-K.")
    partials = torch.empty(split_k * rows * num_out, dtype=torch.float32, device=unused.device)
    return partials, split_k_counters(unused.device)


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off switch read from the environment at import: 1 on, 0 off, unset
    ``default``."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}.")
    return value == "1"


def kept(batch_cache: dict | None, key, build: Callable[[], object]):
    """``batch_cache[key]``, built by ``build()`` and kept there the first time; built on
    every call without a cache. ``batch_cache``: a dict that lives as long as a batch
    layout (a step's layers share it), where the kernels keep what they derive from it."""
    value = None if batch_cache is None else batch_cache.get(key)
    if value is None:
        value = build()
        if batch_cache is not None:
            batch_cache[key] = value
    return value


def env_int(name: str, default: int) -> int:
    """A whole number read from the environment at import; unset ``default``."""
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(value)


# Programmatic dependent launch of the decode path's kernels (set GRIDLLM_LAUNCH_DEPENDENT=0
# before start to turn it off).
LAUNCH_DEPENDENT = env_switch("GRIDLLM_LAUNCH_DEPENDENT")
# Decode kernels launched early read, before they wait, what only the step's inputs and
# earlier steps wrote (positions, slots, sequence lengths, block tables, cached keys other
# than the new one); GRIDLLM_EARLY_READS=0 turns it off.
EARLY_READS = env_switch("GRIDLLM_EARLY_READS")


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, asked once (the kernels' dispatch checks it per
    call)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def _can_launch_dependent(device: torch.device) -> bool:
    return (gdc_wait is not None and device.type == "cuda" and not is_interpreter()
            and capability(device) >= (9, 0))


def launch_dependent_args(device: torch.device) -> dict:
    """Launch arguments of a kernel with a ``USE_GDC`` constexpr: with programmatic dependent
    launch (CUDA compute capability 9.0+, ``LAUNCH_DEPENDENT``) its programs are scheduled
    while the previous kernel in the stream finishes, and wait for it (``gdc_wait``) before
    touching memory it may write; elsewhere a plain launch."""
    if LAUNCH_DEPENDENT and _can_launch_dependent(device):
        return {"USE_GDC": True, "launch_pdl": True}
    return {"USE_GDC": False}


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed guess off CUDA), asked once (launch
    heuristics read it per call)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact (ieee) products so fp32 results match the reference tightly."""
    return "ieee" if dtype == torch.float32 else "tf32"


# The FP8 word paths (attention's value tiles, the batch-1 e4m3 GEMV); GRIDLLM_FP8_WORDS=0
# turns them off, for A/B runs.
FP8_WORDS = env_switch("GRIDLLM_FP8_WORDS")

# Prefill attention's TMA kernel (Hopper+, cache blocks of 32+ tokens);
# GRIDLLM_PREFILL_TMA=0 leaves every prefill to the pointer kernel, for A/B runs.
PREFILL_TMA = env_switch("GRIDLLM_PREFILL_TMA")

# The batch-1 e4m3 GEMV with products in float16 pairs (kernels.gemv), off until it has been
# measured on a GPU: GRIDLLM_GEMV_F16=1 makes it the one-row e4m3 GEMV.
GEMV_F16 = env_switch("GRIDLLM_GEMV_F16", default=False)

# The warp-specialized Gluon prefill kernel (Hopper) takes the batches it serves;
# GRIDLLM_GLUON_PREFILL=0 leaves every batch to the Triton kernels (A/B runs).
GLUON_PREFILL = env_switch("GRIDLLM_GLUON_PREFILL", default=True)

# A step's one-query requests through the decode kernel instead of a prefill kernel's
# query tiles (kernels.prefill_attention, split_one_token). H100 (2026-12-05): a step of a
# 2,048-token chunk among 200 one-token requests 433 us against 888, 256 mixed requests of
# Llama-3-8B 4,504 against 4,271 output tok/s; GRIDLLM_SPLIT_ONE_TOKEN=0 turns it off.
SPLIT_ONE_TOKEN = env_switch("GRIDLLM_SPLIT_ONE_TOKEN")

# Short prompt steps through kernels.chunk_attention (query tiles of the GQA group's heads,
# the keys split across programs) instead of the prefill kernels' program per query head;
# GRIDLLM_CHUNK_ATTENTION=0 turns it off (A/B runs).
CHUNK_ATTENTION = env_switch("GRIDLLM_CHUNK_ATTENTION")


def can_unpack_e4m3_words(t: torch.Tensor) -> bool:
    """Whether a kernel may read the e4m3 tensor ``t`` as 32-bit words and unpack them with
    ``e4m3_words_to_f16``: CUDA (the unpacking is PTX, not in the CPU interpreter), a last
    dim of whole words, every other stride and the start word-aligned."""
    return (FP8_WORDS and t.is_cuda and not is_interpreter() and t.shape[-1] % 4 == 0
            and t.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in t.stride()[:-1]))


@triton.jit
def e4m3_words_to_f16(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS // 4]`` int32 words, each four e4m3 values (little-endian), as the
    ``[ROWS, COLS]`` float16 tile they hold (exact: every e4m3 value is a float16 value).

    Two ``cvt.rn.f16x2.e4m3x2`` per word in the words' own register layout; the float16
    tile is then interleaved by join and reshape. Loading e4m3 as bytes and converting with
    ``.to`` lets the compiler keep the tile in e4m3 until it reaches a ``tl.dot`` operand
    layout, which for an operand whose reduction dim is not contiguous (V in P @ V) means a
    shared-memory load per byte; join and reshape are not moved past, so the tile reaches
    the operand layout as float16 (vector stores, ``ldmatrix.trans``)."""
    h0, h1, h2, h3 = tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi;
        .reg .b32 p01, p23;
        mov.b32 {lo, hi}, $4;
        cvt.rn.f16x2.e4m3x2 p01, lo;
        cvt.rn.f16x2.e4m3x2 p23, hi;
        mov.b32 {$0, $1}, p01;
        mov.b32 {$2, $3}, p23;
        }""", "=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
    # join(join(h0, h2), join(h1, h3))[r, w, i, j] = h[2 * j + i]: element 4w + 2i + j of
    # the row is h[2i + j] of word w.
    return tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), [ROWS, COLS])
