"""The warp-specialized Gluon prefill kernel: its structure compiled for sm_90 (any machine)
and its results against the torch reference (Hopper GPUs; each group of cases in a child
process under a time limit, so a deadlock of its barriers fails the test instead of hanging
it)"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
import torch

import kernels.gluon_prefill_attention as gpa
from kernels.prefill_args import query_tiles
from tests.kernels.conftest import HAS_CUDA, needs_gpu
from tests.kernels.sm90_ptx import compile_for_sm90, loop_body, sass_loop

_HAS_GLUON_HOPPER = gpa.gluon is not None and gpa.TensorDescriptor is not None
# Seconds a child process gets for its cases (compiles included).
_CASE_TIMEOUT_S = 120


def test_serves_only_a_hopper_gpu():
    query = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    assert not gpa.serves(query, cache, cache)


@pytest.mark.parametrize("seed", range(40))
def test_query_tiles_list_each_requests_tiles_latest_first(seed):
    """One row per 128-query tile of each request's chunk (none for a request without
    queries), request by request and each request's latest tile first, as (request, first
    query row, its position, sequence length); the rest of the slots -1; no more slots than
    ``ceil(T / 128) + B``, the bound a step knows without reading the device."""
    rng = random.Random(seed)
    num_reqs = rng.randint(1, 12)
    num_q = [rng.choice([0, 1, 2, 63, 64, 127, 128, 129, 300, 1000]) for _ in range(num_reqs)]
    num_q[rng.randrange(num_reqs)] = rng.randint(1, 700)
    cached = [rng.randint(0, 500) for _ in range(num_reqs)]
    seq_lens = torch.tensor([c + n for c, n in zip(cached, num_q, strict=True)], dtype=torch.int32)
    qsl = torch.tensor([0] + num_q).cumsum(0).to(torch.int32)
    num_tokens = sum(num_q) + rng.randint(0, 300)  # rows past the last request: padding
    tiles = query_tiles(qsl, seq_lens, num_tokens, max(num_q), 128)
    expected = [[r, int(qsl[r]) + 128 * t, cached[r] + 128 * t, cached[r] + n]
                for r, n in enumerate(num_q) for t in reversed(range(-(-n // 128)))]
    assert tiles.dtype == torch.int32 and tiles.is_contiguous()
    assert tiles[:len(expected)].tolist() == expected
    assert (tiles[len(expected):] == -1).all()
    assert len(tiles) <= -(-num_tokens // 128) + num_reqs
    # The persistent launch's order: the same tiles, those that visit the most keys first.
    longest = query_tiles(qsl, seq_lens, num_tokens, max(num_q), 128, longest_first=True)
    assert sorted(longest.tolist()) == sorted(tiles.tolist())
    keys = [min(pos + 128, n) for _, _, pos, n in longest[:len(expected)].tolist()]
    assert keys == sorted(keys, reverse=True)
    assert (longest[len(expected):] == -1).all()


def _alternate_ties_by_loop(tiles: torch.Tensor, block_m: int) -> list[list[int]]:
    """Longest-first rows with every other run of equal key counts reversed, by a loop."""
    rows = tiles.tolist()
    keys = [-1 if r[0] < 0 else min(r[2] + block_m, r[3]) for r in rows]
    out, start, flip = [], 0, False
    for i in range(1, len(rows) + 1):
        if i == len(rows) or keys[i] != keys[start]:
            run = rows[start:i]
            out += run[::-1] if flip and keys[start] >= 0 else run
            flip, start = not flip, i
    return out


@pytest.mark.parametrize("seed", range(20))
def test_alternate_ties_reverse_every_other_run_of_equal_tiles(seed):
    """``alternate_ties``: the longest-first tiles with the second, fourth, ... runs of
    tiles visiting as many keys in reverse order (the device ops against a loop), the
    empty slots last; a uniform batch's runs are its requests' second and first tiles."""
    rng = random.Random(seed)
    num_reqs = rng.randint(1, 40)
    length = rng.choice([64, 128, 256, 300])
    num_q = [length if rng.random() < 0.7 else rng.randint(0, 400) for _ in range(num_reqs)]
    cached = [rng.choice([0, 0, 128, rng.randint(0, 300)]) for _ in range(num_reqs)]
    seq_lens = torch.tensor([c + n for c, n in zip(cached, num_q, strict=True)], dtype=torch.int32)
    qsl = torch.tensor([0] + num_q).cumsum(0).to(torch.int32)
    args = qsl, seq_lens, sum(num_q), max(num_q), 128
    longest = query_tiles(*args, longest_first=True, alternate_ties=False)
    alternated = query_tiles(*args, longest_first=True, alternate_ties=True)
    assert alternated.dtype == torch.int32 and alternated.is_contiguous()
    assert alternated.tolist() == _alternate_ties_by_loop(longest, 128)
    # Only the order within runs changes; with no run of two it changes nothing.
    assert sorted(alternated.tolist()) == sorted(longest.tolist())
    # And the request-order list ignores it.
    assert torch.equal(query_tiles(*args, alternate_ties=True), query_tiles(*args))


def test_alternate_ties_on_a_uniform_batch():
    qsl = torch.arange(0, 4 * 256 + 1, 256, dtype=torch.int32)
    seq_lens = torch.full((4,), 256, dtype=torch.int32)
    tiles = query_tiles(qsl, seq_lens, 1024, 256, 128, longest_first=True, alternate_ties=True)
    # Second tiles (256 keys) request by request, then first tiles (128) backwards.
    assert tiles[:8, 0].tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert tiles[:8, 2].tolist() == [128] * 4 + [0] * 4


def test_tiles_of_another_shape_are_refused_naming_them():
    query = torch.zeros(80, 4, 128, dtype=torch.bfloat16)
    cache = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16)
    tables = torch.arange(8, dtype=torch.int32)[None]
    seq = torch.tensor([80], dtype=torch.int32)
    qsl = torch.tensor([0, 80], dtype=torch.int32)
    with pytest.raises(ValueError, match="tiles"):
        gpa.gluon_prefill_attention(query, cache, cache, tables, seq, qsl, 0.1,
                                    max_query_len=80, tiles=torch.zeros(1, 2, dtype=torch.int32))


@pytest.mark.parametrize("launch,match", [
    (dict(query_buffers=3), "query_buffers must be 1 or 2, got 3"),
    (dict(query_buffers=2), "stages=3 and query_buffers=2 need 262144 bytes"),
    (dict(stages=4), "stages=4 and query_buffers=1 need 294912 bytes")])
def test_launches_past_the_shared_memory_are_refused_naming_them(launch, match):
    query = torch.zeros(80, 4, 128, dtype=torch.bfloat16)
    cache = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16)
    tables = torch.arange(8, dtype=torch.int32)[None]
    seq = torch.tensor([80], dtype=torch.int32)
    qsl = torch.tensor([0, 80], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        gpa.gluon_prefill_attention(query, cache, cache, tables, seq, qsl, 0.1,
                                    max_query_len=80, **launch)


_SWITCHED_ON = r"""
import torch
import kernels._utils as utils
from kernels import torch_ref
from kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import make_paged_kv

assert utils.GLUON_PREFILL
kc, vc, tables, seq = make_paged_kv([80, 70], 2, 128, 16, torch.float32, torch.device("cpu"))
qsl = torch.tensor([0, 80, 150], dtype=torch.int32)
query = torch.randn(150, 4, 128)
out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5, max_query_len=80)
expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5)
torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
"""


def test_the_switch_is_on_by_default_and_sends_only_what_the_kernel_serves():
    """``GRIDLLM_GLUON_PREFILL`` is on unless set to 0; on, a batch the Gluon kernel does
    not serve (here: a CPU) still gets the general kernel's result; a value other than 0/1
    is refused at import, naming the variable."""
    from kernels import _utils

    assert _utils.GLUON_PREFILL == (os.environ.get("GRIDLLM_GLUON_PREFILL", "1") == "1")
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "GRIDLLM_GLUON_PREFILL"}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", _SWITCHED_ON], capture_output=True,
                          text=True, timeout=_CASE_TIMEOUT_S, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", "import kernels._utils as u; "
                           "assert not u.GLUON_PREFILL"], capture_output=True, text=True,
                          timeout=_CASE_TIMEOUT_S, cwd=root,
                          env=dict(env, GRIDLLM_GLUON_PREFILL="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", "import kernels._utils"], capture_output=True,
                          text=True, timeout=_CASE_TIMEOUT_S, cwd=root,
                          env=dict(env, GRIDLLM_GLUON_PREFILL="yes"))
    assert done.returncode != 0 and "GRIDLLM_GLUON_PREFILL must be 0 or 1" in done.stderr


def _compile(layouts_arg: int | list, block_size: int, launch: dict, sass: bool = False):
    """``compile_for_sm90`` of the kernel with ``launch``'s constexprs (4 query heads a KV
    head, ``_layouts(*layouts_arg)``'s tiles of keys) at the served register split."""
    block_n = layouts_arg[0] if isinstance(layouts_arg, list) else layouts_arg
    piece = min(block_size, block_n)
    return compile_for_sm90(
        "kernels.gluon_prefill_attention", "_gluon_prefill_attention_kernel", layouts_arg,
        dict(bt_ptr="*i32", tiles_ptr="*i32", out_ptr="*bf16"),
        dict(GROUP=4, BLOCK_SIZE=block_size, BLOCK_N=block_n, CONSUMER_REGS=240,
             LOAD_REGS=24, **launch),
        floats=("qk_scale",),
        descriptors=dict(desc_q=((256, 4096), [64, 128], "bfloat16"),
                         desc_k=((4096, 1024), [piece, 64], "bfloat16"),
                         desc_v=((4096, 1024), [piece, 64], "bfloat16")),
        options={"num_warps": 4, "maxnreg": gpa.MAX_REGS}, sass=sass)


@pytest.mark.sm90
@pytest.mark.skipif(not _HAS_GLUON_HOPPER, reason="Triton without Gluon's Hopper API")
@pytest.mark.parametrize("block_size,block_n,overlap,persistent",
                         [(16, 128, False, False), (64, 64, False, False),
                          (256, 128, False, False), (16, 128, True, False),
                          (64, 64, True, False), (16, 128, True, True),
                          (16, 128, False, True), (16, 128, False, "lead"),
                          (16, 128, True, "lead")])
def test_a_load_warp_feeds_two_consumer_warpgroups(block_size, block_n, overlap, persistent):
    """Compiled for sm_90: the load warp issues a bulk copy per cache block and half head of
    each key and value tile (plus four for the query tile), the block numbers of the next
    tile in one load before it waits for a free stage (so no copy waits on a load of its
    own); the consumers run every product on ``wgmma``, none serialized by ptxas (it does
    that to all of them once a product's registers are touched in flight); the consumer
    warpgroups get 240 registers and the load warp 24. Without ``overlap`` each product is
    retired before the softmax; with it, in the machine code of the main loop, the softmax
    (every ``exp2``) runs after the scores' product is retired and before P @ V is. The
    persistent launch (each partition walking the program's items) compiles to the same
    consumers and copies, also with two query buffers and the next item's row read early
    (``"lead"``)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    ptx, sass = _compile(block_n, block_size, dict(
        STAGES=2, OVERLAP=overlap, PERSISTENT=bool(persistent),
        QUERY_BUFFERS=2 if persistent == "lead" else 1, NEXT_ROW=persistent == "lead"),
        sass=True)
    pieces = block_n // min(block_size, block_n)
    assert len(re.findall(r"cp\.async\.bulk\.tensor", ptx)) == 2 * 2 * pieces + 4
    if not persistent:  # (persistent, the query tile's copies sit in the first iteration)
        copies = loop_body(ptx, "cp.async.bulk.tensor")
        assert copies.count("cp.async.bulk.tensor") == 2 * 2 * pieces
        assert len(re.findall(r"ld\.global", copies)) == 1
        assert copies.index("ld.global") < copies.index("mbarrier.try_wait")
    assert "mma.sync" not in ptx
    # Per consumer: the first tile's scores, two loops of values and scores, the last
    # tile's values (one wgmma per 16 of the reduction dim).
    per_consumer = 128 // 16 + 2 * (128 // 16 + block_n // 16) + block_n // 16
    assert ptx.count("wgmma.mma_async") == 2 * per_consumer
    waits = set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    assert waits == ({"0", "1"} if overlap else {"0"})
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24\b", ptx)

    loop = sass_loop(sass, "MUFU.EX2")
    products = [i for i, t in enumerate(loop) if t.startswith("HGMMA")]
    assert len(products) == 128 // 16 + block_n // 16
    retired = [(i, t.split()[-1]) for i, t in enumerate(loop)
               if t.startswith("WARPGROUP.DEPBAR")]
    # One retirement (or, overlapped, two) after the products are all issued.
    assert [n for _, n in retired] == (["0x1", "0x0"] if overlap else ["0x0"])
    assert retired[0][0] > products[-1]
    exps = [i for i, t in enumerate(loop) if t.startswith("MUFU.EX2")]
    assert len(exps) >= 2 * block_n // 4
    if overlap:
        assert retired[0][0] < exps[0] and exps[-1] < retired[1][0]


@pytest.mark.sm90
@pytest.mark.skipif(not _HAS_GLUON_HOPPER, reason="Triton without Gluon's Hopper API")
def test_the_output_is_stored_in_whole_sectors_as_served():
    """Compiled for sm_90 as served (three stages of 128-key tiles): each consumer stores
    its 64 x 128 output rows with ``whole_sectors`` (the default) in 8-byte stores (16 a
    thread, a row's four lanes a whole 32-byte sector), regrouped by shuffles, or without
    it from the wgmma accumulator's layout in 4-byte stores (32 a thread, a row's four
    lanes half a sector): no shared-memory store past those the launch has either way."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    served = dict(STAGES=3, OVERLAP=False, PERSISTENT=True, QUERY_BUFFERS=1, NEXT_ROW=False)
    ptx = {whole_sectors: _compile([128, whole_sectors], 16, served)
           for whole_sectors in (False, True)}
    stores = {k: re.findall(r"st\.global(\.v\d)?\.b32", v) for k, v in ptx.items()}
    assert stores == {False: [""] * 2 * 32, True: [".v2"] * 2 * 16}
    assert ptx[True].count("st.shared") == ptx[False].count("st.shared")
    assert "shfl.sync" in ptx[True]
    assert gpa.WHOLE_SECTORS


_CHILD = r"""
import json, sys
import torch
import kernels.gluon_prefill_attention as gpa
from kernels import torch_ref
from kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import TOLERANCES, make_paged_kv

results = []
for seq_lens, query_lens, heads, kv_heads, block_size, dtype, launch in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    device = torch.device("cuda")
    kc, vc, tables, seq = make_paged_kv(seq_lens, kv_heads, 128, block_size, dtype, device)
    for i, n in enumerate(seq_lens):  # slots past each sequence: NaN
        if n % block_size:
            last = tables[i, (n - 1) // block_size]
            kc[last, n % block_size:] = float("nan")
            vc[last, n % block_size:] = float("nan")
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(query_lens), heads, 128, device=device).to(dtype)
    assert gpa.serves(query, kc, vc)
    out = torch.full_like(query, float("nan"))
    if "split_one_token" in launch:  # as served: one-query requests to the decode kernel
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                max_query_len=max(query_lens), batch_cache={}, **launch)
    else:
        gpa.gluon_prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                    max_query_len=max(query_lens), out=out, **launch)
    torch.cuda.synchronize()
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5)
    atol, rtol = TOLERANCES[dtype]
    bad = ~torch.isclose(out.float(), expected.float(), atol=atol, rtol=rtol)
    results.append(int(bad.sum()))
print(json.dumps(results))
"""


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon prefill kernel needs a Hopper GPU (compute "
                           "capability 9.x)")
@pytest.mark.parametrize("cases", [
    # (seq_lens, query_lens, heads, kv heads, cache block, dtype, launch overrides)
    [([1], [1], 8, 2, 16, "bfloat16", {}),
     ([77, 300, 1000], [77, 300, 1000], 16, 4, 16, "bfloat16", {}),
     ([700, 1000], [130, 300], 32, 4, 64, "bfloat16", {}),
     ([1000, 129], [1000, 129], 8, 8, 256, "float16", {})],
    [([300, 1000], [300, 1000], 16, 4, 16, "bfloat16", dict(block_n=64)),
     # A chunk among one- and two-query requests (a step of continuous batching): a
     # program per tile, not per request x longest chunk.
     ([40, 1000, 90, 33, 500, 7], [1, 400, 2, 1, 500, 1], 8, 2, 16, "bfloat16", {}),
     ([700, 77], [130, 77], 16, 2, 32, "bfloat16", dict(stages=3)),
     ([700], [1], 8, 2, 128, "float16", dict(block_n=64, stages=4))],
    # The defaults wait for both products before the softmax; the sweeps' alternative runs
    # it under P @ V: a first tile with and without a mask, one tile only, persistent.
    [([1], [1], 8, 2, 16, "bfloat16", dict(overlap=True, persistent=False)),
     ([77, 300, 1000], [77, 300, 1000], 16, 4, 16, "bfloat16",
      dict(overlap=True, persistent=False)),
     ([700, 1000], [130, 300], 32, 4, 64, "bfloat16",
      dict(overlap=True, block_n=64, persistent=False)),
     ([1000, 129], [1000, 129], 8, 8, 256, "float16", dict(overlap=True, stages=2)),
     ([2048, 700], [2048, 130], 16, 4, 16, "bfloat16", dict(overlap=True))],
    # A program per item instead of the default program per SM walking the items: one
    # item, several with and without masks, a mix of one-query requests and chunks.
    [([1], [1], 8, 2, 16, "bfloat16", dict(persistent=False)),
     ([77, 300, 1000], [77, 300, 1000], 16, 4, 16, "bfloat16", dict(persistent=False)),
     ([40, 1000, 90, 33, 500, 7], [1, 400, 2, 1, 500, 1], 8, 2, 16, "bfloat16",
      dict(persistent=False)),
     ([700, 1000], [130, 300], 32, 4, 64, "bfloat16", dict(persistent=False)),
     ([2048, 2048], [2048, 2048], 32, 8, 16, "bfloat16", dict(stages=2))],
    # The persistent launch with the next item's query tile in a second buffer (two
    # stages) and the next item's row read early, alone and together: many short items a
    # program (each buffer reused several times), one-query requests among chunks, cached
    # prefixes with 64-key tiles and the overlap, 64-key tiles at three stages.
    [([256] * 48, [256] * 48, 8, 2, 16, "bfloat16", dict(query_buffers=2, stages=2)),
     ([256] * 48, [256] * 48, 8, 2, 16, "bfloat16", dict(next_row=True)),
     ([40, 1000, 90, 33, 500, 7], [1, 400, 2, 1, 500, 1], 8, 2, 16, "bfloat16",
      dict(query_buffers=2, stages=2, next_row=True)),
     ([700, 1000, 2048], [130, 300, 2048], 32, 4, 64, "float16",
      dict(query_buffers=2, stages=2, next_row=True, overlap=True, block_n=64)),
     ([900, 129], [900, 129], 8, 2, 16, "bfloat16", dict(query_buffers=2, block_n=64))],
    # The output stored straight from the accumulator's layout (half sectors; the served
    # launch stores whole ones): whole and partial query tiles (rows past a request's
    # queries are another request's), persistent and a program per item, float16, 64-key
    # tiles, the overlap.
    [([256] * 48, [256] * 48, 8, 2, 16, "bfloat16", dict(whole_sectors=False)),
     ([40, 1000, 90, 33, 500, 7], [1, 400, 2, 1, 500, 1], 8, 2, 16, "bfloat16",
      dict(whole_sectors=False)),
     ([77, 300, 1000], [77, 300, 1000], 16, 4, 16, "float16",
      dict(whole_sectors=False, persistent=False)),
     ([700, 1000, 129], [130, 300, 129], 32, 4, 64, "bfloat16",
      dict(whole_sectors=False, block_n=64, overlap=True))],
    # Through prefill_attention with one-query requests sent to the decode kernel: among
    # chunks, first, with a long context (split-KV), and a batch of them only.
    [([40, 1000, 90, 33, 500, 7], [1, 400, 2, 1, 500, 1], 8, 2, 16, "bfloat16",
      dict(split_one_token=True)),
     ([300, 77, 1000], [1, 1, 1000], 16, 4, 64, "bfloat16", dict(split_one_token=True)),
     ([129, 20000, 300], [129, 1, 64], 32, 8, 16, "float16", dict(split_one_token=True)),
     ([129, 70], [64, 1], 8, 2, 16, "bfloat16", dict(split_one_token=False))],
], ids=["defaults", "launches", "overlap", "per_item", "item_lead", "half_sectors",
        "split_one_token"])
def test_matches_reference_gpu(cases):
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)],
                          capture_output=True, text=True, timeout=_CASE_TIMEOUT_S,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    mismatches = json.loads(done.stdout.strip().splitlines()[-1])
    assert mismatches == [0] * len(cases), f"mismatched elements per case: {mismatches}"
