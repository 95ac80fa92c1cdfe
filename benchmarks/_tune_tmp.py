import sys, os, torch, triton
sys.path.insert(0, os.getcwd())
from benchmarks.kernels import paged_kv, bench
from kernels.prefill_attention import _prefill_attention_kernel
from kernels.paged_decode_attention import paged_decode_attention, _LOG2E
S, H, HKV, D = 4096, 32, 8, 128
kc, vc, tables, seq = paged_kv(4, S, HKV, D, 16, torch.bfloat16)
q = torch.randn(4 * S, H, D, device="cuda", dtype=torch.bfloat16)
qsl = torch.arange(0, 4 * S + 1, S, dtype=torch.int32, device="cuda")
out = torch.empty_like(q)
flops = 4 * 4 * H * D * S * (S + 1) / 2
for bm, bn, w, st in [(128,64,8,3),(128,128,8,3),(128,64,8,4),(128,128,8,2),(128,64,4,3),(64,64,4,3),(128,32,8,3),(256,64,8,3)]:
    nt = triton.cdiv(S, bm)
    def f():
        _prefill_attention_kernel[(H, nt, 4)](q, kc, vc, tables, seq, qsl, out, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0), out.stride(0), out.stride(1), D**-0.5*_LOG2E, 16, 0, nt, GROUP=4, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn, HAS_WINDOW=False, DOT_PRECISION="tf32", num_warps=w, num_stages=st)
    try:
        ms = bench(f, 200); print("prefill", bm, bn, w, st, f"{flops/ms/1e9:.0f} TFLOP/s", flush=True)
    except Exception as e: print("prefill", bm, bn, w, st, "ERR", str(e)[:100])
for B, ctx in [(1, 32768), (4, 8192), (64, 4096)]:
    kc2, vc2, t2, s2 = paged_kv(B, ctx, HKV, D, 16, torch.bfloat16)
    q2 = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * B * ctx * HKV * D * 2
    for ns in [1, 2, 4, 8, 16, 32, 64]:
        ms = bench(lambda: paged_decode_attention(q2, kc2, vc2, t2, s2, None, 0.1, num_splits=ns))
        print("decode", B, ctx, ns, f"{nbytes/ms/1e6:.0f} GB/s", flush=True)
