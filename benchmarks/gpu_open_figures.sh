#!/usr/bin/env bash
# The Hopper-kernel measurements still open in docs/performance.md, in one run of at most
# ~9 minutes (set up as benchmarks/gpu_suite.sh describes: wheels in .whl/, PYTHONPATH):
#
#   OUT=/path/to/results bash benchmarks/gpu_open_figures.sh
#
# Steps (each with a time cap; a step starts only while OPEN_BUDGET_S, default 540 s, has
# room for it; OPEN_STEPS="name ..." runs only those, OPEN_STEPS=goals the goal table's,
# OPEN_STEPS=by_card those on an H200 and the Hopper checks elsewhere):
#   gluon_prefill_tests  the warp-specialized Gluon prefill kernel's GPU tests (each group of
#                        cases in a child process under two minutes, so a barrier deadlock
#                        fails instead of hanging)
#   compile_checks       no Triton compilation after warm-up (eager, graphs, structured
#                        outputs)
#   fp8_tests            FP8 checkpoints, KV-cache scales computed at load and the decode
#                        GEMVs (the float16-pair kernel too)
#   fp8_kv_tests         the FP8 KV-cache kernel tests, e4m3 and e5m2, all on the GPU
#   gemv_f16             the batch-1 e4m3 GEMVs as served: the float16-pair kernel's column
#                        and decoder row next to the word kernel's
#   gluon_prefill_sweep  the Gluon kernel's launches (tile, stages, overlap, persistent)
#                        against the Triton kernels and torch SDPA at cache blocks of 16
#                        and 64
#   prefill_vs_sdpa      the served prefill kernel and torch SDPA timed in turns
#   prefill_launches_ab  the same at 4 x 4096 tokens, five rounds, with the Gluon
#                        kernel's overlap, two stages and both in the turns too
#   item_lead_ab         the same at 4 x 4096, 16 x 1024 and 64 x 256 tokens, with the
#                        persistent launch's next query tile in a second buffer (two
#                        stages), the next item's row read early, and both, in the turns
#   prefill_order_ab     the same at 16 x 1024 and 64 x 256 tokens with the persistent
#                        launch's items request by request (a request's tiles together)
#                        instead of longest first
#   sectors_tests, sectors_ab
#                        the output stored from the accumulator's layout in half sectors
#                        (whole_sectors=0; served: whole 32-byte sectors): its GPU tests,
#                        then the same turns at 4 x 4096, 16 x 1024 and 64 x 256 with it,
#                        with the items request by request, and with every other run of
#                        equally long tiles backwards (alternate_ties)
#   prefill_ncu          Nsight Compute over one launch of the served prefill kernel (64 x 256
#                        and 4 x 4096), of SDPA and of the Gluon kernel storing half sectors
#                        (64 x 256): benchmarks/prefill_ncu.sh (NCU_ONLY=half_sectors: that
#                        one only)
#   prefill_mixed        prefill attention on a step of one chunk among 200 one-token
#                        requests (served, gathered, without the split by either
#                        launch, each part alone): GPU time, host time per call, and a
#                        profile of the served call's host time
#   decode_tests         every decode-attention test on the GPU, not only -m gpu
#   split_kv_ab          split-KV decode at batch 1, 2 and 4: block numbers a tile ahead or
#                        not, 32- or 64-key tiles, 2 or 3 stages (the default launch's A/B)
#   kernels              the kernel table (benchmarks/kernels.py)
#   split_kv_layers      split-KV decode at batch 1, 2 and 4 x 32k keys, 8 calls a CUDA
#                        graph over their own caches (as a step's layers), and the
#                        read-only floor timed alike
#   split_kv_layers_sweep
#                        the same timing over split counts, keys a tile, stages and block
#                        numbers a tile ahead or not, at 8k and 32k keys (past the budget)
#   lat_fp8, lat_fp8_f16 batch-1 decode of random:llama3-8b with FP8 weights and KV cache,
#                        the word GEMV and then the float16-pair one (GRIDLLM_GEMV_F16=1)
#                        (past the default budget: OPEN_STEPS="gemv_f16 lat_fp8 lat_fp8_f16")
#   lat_bf16             batch-1 decode of random:llama3-8b in bf16 (past the default
#                        budget: OPEN_STEPS=lat_bf16)
#   prefill_e2e, prefill_e2e_off
#                        offline throughput of random:llama3-8b on 4096-token prompts with
#                        the Gluon prefill kernel served, then with GRIDLLM_GLUON_PREFILL=0
#                        (past the default budget: OPEN_STEPS="prefill_e2e prefill_e2e_off")
#   mixed_e2e, mixed_e2e_nosplit
#                        offline throughput of random:llama3-8b, 256 requests whose steps mix
#                        prompt chunks with decodes, then with GRIDLLM_SPLIT_ONE_TOKEN=0
#                        (past the default budget: OPEN_STEPS="mixed_e2e mixed_e2e_nosplit")
#   mixed_periods, mixed_periods_nosplit
#                        step periods, host launch time and waits of 256 x 1,024-token
#                        prompts (steps that mix chunks with decodes), then with
#                        GRIDLLM_SPLIT_ONE_TOKEN=0 (past the default budget)
#   gemv_sweep           one-row tile configurations of the word and float16-pair GEMVs
#                        (past the default budget: OPEN_STEPS=gemv_sweep)
#   piecewise_tests, piecewise_periods, piecewise_periods_eager, piecewise_mixed,
#   piecewise_mixed_eager
#                        prefill and mixed steps from graphs cut at attention: their GPU
#                        tests, then step periods of 512- and 2,048-token steps with them
#                        and with GRIDLLM_PIECEWISE_GRAPHS=0 (past the default budget)
#   busy_prompt, busy_prompt_eager
#                        GPU busy fraction, kernels and host profile of 512-token prompt
#                        steps, with graphs cut at attention and without (past the budget)
#   busy_prompt_small, busy_prompt_small_eager
#                        the same at 64-token prompt steps, where the host's share is largest
#   chunk_tests          the chunk kernel's GPU tests and prefill attention's (short steps
#                        now dispatch to it)
#   chunk_bench          short prompt steps' attention with the chunk kernel and without,
#                        and its launches (benchmarks/chunk_attention.py --sweep)
#   busy_small_chunk_off, busy_small_fp8, busy_small_fp8_chunk_off
#                        64-token prompt steps (bf16, then FP8 weights and KV cache) with
#                        GRIDLLM_CHUNK_ATTENTION=0 against the default
#   split_launch_ab      split-KV decode's default launch against candidates, in turns, in
#                        a graph of one call and of 8 (benchmarks/split_kv_ab.py)
#   busy_long1, busy_long_64keys1, busy_long_prefetch1, busy_long2, ...
#                        decode steps of random:qwen3-0.6b at batch 1 over 32k tokens, the
#                        default split-KV launch against 64 keys and 2 stages, and against
#                        block numbers a tile ahead, twice in turns (past the budget)
#   launch_host          host time of the eager attention calls of short and mixed steps,
#                        their step's plans kept and built anew, and of each Triton launch
#   direct_tests, busy_small_direct1, busy_small_jit1, busy_small_direct2, busy_small_jit2
#                        launches straight to the compiled kernels (GRIDLLM_DIRECT_LAUNCH=1):
#                        the chunk kernel's and a mixed step's decode GPU tests with them,
#                        then 64-token prompt steps with them and without, in turns
#   busy_qwen_direct1, busy_qwen_jit1, busy_qwen_direct2, busy_qwen_jit2
#                        the same A/B on random:qwen3-0.6b, whose 64-token steps the host
#                        bounds
#   direct_ab_qwen, busy_qwen_host_direct, busy_qwen_host_jit
#                        that A/B in one process, windows of steps in turns
#                        (benchmarks/switch_ab.py), and the host profile of those steps
#                        with direct launches and without
#   launch_default_tests, query_tiles_tests, parity_tests
#                        with direct launches on: the attention kernels' GPU tests, the
#                        query-tile kernel's, and tests/gridllm/test_gpu.py but its
#                        structured-outputs case
#   qwen_mixed_direct1, qwen_mixed_jit1, qwen_mixed_direct2, qwen_mixed_jit2
#                        offline throughput of random:qwen3-0.6b, steps of at most 512
#                        tokens mixing prompt chunks and decodes, direct launches on and
#                        off, in turns
#   tiles_ab_qwen        those steps with the query-tile kernel and with the torch ops,
#                        in turns in one process
#   busy_qwen_now1, busy_qwen_prev1, busy_qwen_now2, busy_qwen_prev2
#                        random:qwen3-0.6b's 64-token steps, and the same from the checkout
#                        in AB_PREV (a directory), in turns
#   busy_b1_fp8, busy_b1_fp8_nopdl
#                        batch-1 FP8 decode steps of random:llama3-8b under torch.profiler
#                        with a Chrome trace, with dependent launches and without
#   early_tests, b1_now1, b1_early_off1, b1_now2, b1_early_off2
#                        early reads' GPU tests, then batch-1 FP8 decode steps with them
#                        and without, in turns
#   b1_split8_1, b1_split16_1, ..., b1_split1024_1, b1_bf16_split16_1, b1_bf16_split32_1,
#   b1_split8_2, ...     batch-1 decode steps at short-context split floors (FP8: 8, the
#                        default, to 1,024 keys a split; bf16: 16, the default, and 32)
#   early_e2e_tests      the FP8 layers' GPU tests and greedy ids with early reads on and off
#   b1_tiles_served_1, b1_tiles_o4k_1, b1_tiles_o2k_1, b1_tiles_oqkv4k_1, b1_tiles_all4k_1,
#   b1_tiles_served_2, ...
#                        batch-1 FP8 steps with the e4m3 GEMVs' tiles along K as served and
#                        whole rows (4,096) or half (2,048) for o, o and q/k/v, and those and
#                        gate/up, in turns
#   b1_down_4x1024_1, b1_down_8x512_1, b1_down_2x512_1, b1_o_4x1024_1, b1_o_4x512_1,
#   b1_down_4x1024_2, ...
#                        batch-1 FP8 steps with the down and o GEMVs at other channel
#                        counts and tiles, in turns (not yet run)
#   lat_fp8_o4k, lat_fp8_all4k
#                        end to end with o, and with all three, whole rows
#   inputs_tests, b1_inputs_1, b1_inputs_torch_1, qwen_b64_inputs_1,
#   qwen_b64_inputs_torch_1, b1_f32logits_1, qwen_b64_f32logits_1, b1_inputs_2, ...
#                        the step-input kernels' GPU test, then batch-1 FP8 steps of
#                        random:llama3-8b and batch-64 decode steps of random:qwen3-0.6b
#                        with them and with the torch ops they replace, and with the
#                        greedy argmax over float32 logits instead of bf16, in turns
#   qknorm_tests, qwen_b64_qknorm_1, qwen_b64_qknorm_off_1, qwen_b64_qknorm_2, ...
#                        Qwen3's q/k norms in one in-place kernel: its GPU tests, then
#                        batch-64 decode steps of random:qwen3-0.6b with it and with the
#                        norms of copied views, in turns
#   sampling_tests, qwen_b64_draw_1, qwen_b64_draw_f32_1, qwen_b64_draw_2, ...
#                        the sampling kernel's GPU tests, then batch-64 decode steps of
#                        random:qwen3-0.6b that draw (temperature 0.8): the kernel over
#                        bf16 logits and over a float32 copy
#   sampling_bench, qwen_b64_draw_now_1, qwen_b64_draw_prev_1, qwen_b64_draw_now_2, ...
#                        the sampling kernels alone on decode-sized batches
#                        (benchmarks/sampling.py), beside the copies of
#                        kernels/sampling.py that SAMPLING_COMPARE names ("NAME=FILE ..."),
#                        then batch-64 drawing steps of random:qwen3-0.6b as served and
#                        with the first of those copies, in turns
#   sampling_compile     the sampling kernels' build time from an empty Triton cache, this
#                        checkout's and those copies' (benchmarks/sampling.py --compile)
#   piecewise_fp8, piecewise_fp8_eager
#                        the 512-token prompt steps' periods with FP8 weights and KV cache,
#                        with graphs cut at attention and without (past the budget)
# Results: $OUT/open.log (each step's output tail), $OUT/<step>.log, $OUT/*.json.
set -u

OUT=${OUT:-$(mktemp -d /tmp/gridllm-open.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${OPEN_BUDGET_S:-540}
START=$(date +%s)
LOG="$OUT/open.log"
. "$(dirname "$0")/gpu_env.sh"

# OPEN_STEPS=goals: the goal table's rows in one call (~9 minutes): the kernel table, the
# split-KV launch A/B, prefill against SDPA in turns, batch-1 decode in FP8 and bf16.
# OPEN_STEPS=by_card: those on an H200 (the goals are the H200's); on another card the
# half-sector store's GPU tests, the kernel table, prefill against SDPA and FP8 batch-1 decode
# (~7 minutes).
if [ "${OPEN_STEPS:-}" = by_card ]; then
  if nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H200; then
    OPEN_STEPS=goals
  else
    OPEN_STEPS="sectors_tests kernels prefill_vs_sdpa lat_fp8"
  fi
  echo "OPEN_STEPS=$OPEN_STEPS"
fi
if [ "${OPEN_STEPS:-}" = goals ]; then
  OPEN_STEPS="kernels split_launch_ab prefill_vs_sdpa lat_fp8 lat_bf16"
fi
# step NAME CAP_S CMD...: gpu_env.sh's timed_step (its status the command's, 1 when skipped).
STEP_SELECT=${OPEN_STEPS:-} STEP_DIR=$OUT
step() { timed_step "$@"; }

PYTEST="$PY -m pytest -q -p no:cacheprovider -m gpu"
step gluon_prefill_tests 300 $PYTEST tests/kernels/test_gluon_prefill_attention.py
# No Triton compilation after the warm-up (eager and CUDA graphs).
step compile_checks 330 $PYTEST -rf tests/gridllm/test_gpu.py -k no_triton_compilation
step fp8_tests 150 $PYTEST tests/worker_svc/test_fp8_checkpoint.py tests/kernels/test_gemv.py \
  tests/worker_svc/test_kv_calibration.py
# Every case of the FP8 KV-cache kernel tests (e4m3 and e5m2) on the GPU, not only -m gpu.
step fp8_kv_tests 90 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_kv_cache.py
step gemv_f16 100 $PY benchmarks/gemv.py --rows 1 --fp8 --fused --output "$OUT/gemv_f16.json"
# The Triton kernel at one launch (its own sweep is benchmarks/kernels.py's), then the
# Gluon kernel's launches.
GRIDLLM_GLUON_PREFILL=0 step gluon_prefill_sweep 200 $PY benchmarks/attention_sweep.py \
  --kinds prefill --gluon-prefill --cache-block-sizes 16 64 --block-m 128 \
  --block-n-prefill 64 --warps-prefill 8 --stages 3 --output "$OUT/gluon_prefill_sweep.json"
step prefill_vs_sdpa 60 $PY benchmarks/prefill_vs_sdpa.py --output "$OUT/prefill_vs_sdpa.json"
step prefill_launches_ab 150 $PY benchmarks/prefill_vs_sdpa.py --rounds 5 \
  --alt overlap=1 stages=2 overlap=1,stages=2 --output "$OUT/prefill_launches_ab.json"
step item_lead_ab 200 $PY benchmarks/prefill_vs_sdpa.py --rounds 4 --rep-ms 100 \
  --shapes 4x4096 16x1024 64x256 --alt next_row=1 stages=2 query_buffers=2,stages=2 \
  query_buffers=2,stages=2,next_row=1 --output "$OUT/item_lead_ab.json"
step prefill_order_ab 120 $PY benchmarks/prefill_vs_sdpa.py --rounds 3 --rep-ms 100 \
  --shapes 16x1024 64x256 --alt longest_first=0 --output "$OUT/prefill_order_ab.json"
step sectors_tests 120 $PYTEST tests/kernels/test_gluon_prefill_attention.py -k half_sectors
step sectors_ab 200 $PY benchmarks/prefill_vs_sdpa.py --rounds 3 --rep-ms 100 \
  --shapes 4x4096 16x1024 64x256 --alt whole_sectors=0 longest_first=0 alternate_ties=1 \
  --output "$OUT/sectors_ab.json"
PY=$PY OUT=$OUT step prefill_ncu 300 bash benchmarks/prefill_ncu.sh
step prefill_mixed 60 $PY benchmarks/prefill_mixed.py --profile --output "$OUT/prefill_mixed.json"
# Every decode-attention test on the GPU (the default launches as served).
step decode_tests 120 $PY -m pytest -q -p no:cacheprovider -rf --maxfail=3 \
  tests/kernels/test_paged_decode_attention.py
step split_kv_ab 120 $PY benchmarks/attention_sweep.py --kinds decode --prefetch-table 0 1 \
  --block-n 32 64 --stages 2 3 --output "$OUT/split_kv_ab.json"
step kernels 150 $PY benchmarks/kernels.py --output "$OUT/kernels.json"
# Split-KV decode as a step's layers run it (8 calls a graph, each over its own cache),
# beside the read-only floor under the same timing.
step split_kv_layers 150 $PY benchmarks/attention_sweep.py --kinds decode --layers 8 \
  --read-floor --contexts 32768 --splits 32 64 128 --block-n 32 64 --warps 4 --stages 2 3 \
  --output "$OUT/split_kv_layers.json"
step split_kv_layers_sweep 300 $PY benchmarks/attention_sweep.py --kinds decode --layers 8 \
  --contexts 8192 32768 --splits 16 32 64 128 --block-n 32 64 --warps 4 --stages 2 3 \
  --prefetch-table 0 1 --output "$OUT/split_kv_layers_sweep.json"
LAT="$PY -m gridllm.bench latency --model random:llama3-8b --input-len 128 --output-len 128
  --num-iters 3 --num-warmup 1 --quantization fp8 --kv-cache-dtype fp8 --no-tqdm"
step lat_fp8 90 $LAT --output "$OUT/lat_fp8.json"
GRIDLLM_GEMV_F16=1 step lat_fp8_f16 90 $LAT --output "$OUT/lat_fp8_f16.json"
LAT_BF16="$PY -m gridllm.bench latency --model random:llama3-8b --input-len 128
  --output-len 128 --num-iters 3 --num-warmup 1 --no-tqdm"
step lat_bf16 90 $LAT_BF16 --output "$OUT/lat_bf16.json"
E2E="$PY -m gridllm.bench throughput --model random:llama3-8b --num-prompts 32
  --input-len-range 4096:4096 --output-len-range 16:16 --max-num-batched-tokens 16384
  --max-model-len 8192 --no-roofline --no-tqdm"
step prefill_e2e 140 $E2E --output "$OUT/prefill_e2e.json"
GRIDLLM_GLUON_PREFILL=0 step prefill_e2e_off 140 $E2E --output "$OUT/prefill_e2e_off.json"
MIXED="$PY -m gridllm.bench throughput --model random:llama3-8b --num-prompts 256
  --input-len-range 256:2048 --output-len-range 64:512 --max-num-batched-tokens 4096
  --no-roofline --no-tqdm"
step mixed_e2e 150 $MIXED --output "$OUT/mixed_e2e.json"
GRIDLLM_SPLIT_ONE_TOKEN=0 step mixed_e2e_nosplit 150 $MIXED --output "$OUT/mixed_e2e_nosplit.json"
PERIODS="$PY benchmarks/step_periods.py --model random:llama3-8b --num-prompts 256
  --input-len 1024 --output-len 128 --max-num-batched-tokens 4096"
step mixed_periods 120 $PERIODS --output "$OUT/mixed_periods.json"
GRIDLLM_SPLIT_ONE_TOKEN=0 step mixed_periods_nosplit 120 $PERIODS \
  --output "$OUT/mixed_periods_nosplit.json"
step gemv_sweep 300 $PY benchmarks/gemv.py --rows 1 --fp8 --fused --sweep \
  --output "$OUT/gemv_sweep.json"
# Graphs cut at attention: their GPU tests, then prompt steps of 512 and 2,048 tokens with
# them and eager.
step piecewise_tests 300 $PYTEST -rf tests/gridllm/test_gpu.py -k "cut_at_attention"
SMALL="$PY benchmarks/step_periods.py --model random:llama3-8b --num-prompts 4
  --input-len 2048 --output-len 64 --max-num-batched-tokens 512 --max-num-seqs 4"
step piecewise_periods 90 $SMALL --output "$OUT/piecewise_periods.json"
GRIDLLM_PIECEWISE_GRAPHS=0 step piecewise_periods_eager 90 $SMALL \
  --output "$OUT/piecewise_periods_eager.json"
MID="$PY benchmarks/step_periods.py --model random:llama3-8b --num-prompts 256
  --input-len 1024 --output-len 128 --max-num-batched-tokens 2048"
step piecewise_mixed 120 $MID --output "$OUT/piecewise_mixed.json"
GRIDLLM_PIECEWISE_GRAPHS=0 step piecewise_mixed_eager 120 $MID \
  --output "$OUT/piecewise_mixed_eager.json"
BUSY="$PY -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 4 --input-len 2048
  --prompt-chunk 512 --num-steps 12 --host-profile"
step busy_prompt 120 $BUSY --output "$OUT/busy_prompt.json"
GRIDLLM_PIECEWISE_GRAPHS=0 step busy_prompt_eager 120 $BUSY --output "$OUT/busy_prompt_eager.json"
BUSY_SMALL="$PY -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 4
  --input-len 2048 --prompt-chunk 64 --num-steps 24 --host-profile"
step busy_prompt_small 120 $BUSY_SMALL --output "$OUT/busy_prompt_small.json"
GRIDLLM_PIECEWISE_GRAPHS=0 step busy_prompt_small_eager 120 $BUSY_SMALL \
  --output "$OUT/busy_prompt_small_eager.json"
step chunk_tests 220 $PY -m pytest -q -p no:cacheprovider -rf -m gpu \
  tests/kernels/test_chunk_attention.py tests/kernels/test_prefill_attention.py \
  tests/kernels/test_paged_decode_attention.py::test_gpu_mixed_step_layers_share_the_decode_launch
step chunk_bench 240 $PY benchmarks/chunk_attention.py --sweep --output "$OUT/chunk_bench.json"
GRIDLLM_CHUNK_ATTENTION=0 step busy_small_chunk_off 120 $BUSY_SMALL \
  --output "$OUT/busy_small_chunk_off.json"
step busy_small_fp8 120 $BUSY_SMALL --quantization fp8 --kv-cache-dtype fp8 \
  --output "$OUT/busy_small_fp8.json"
GRIDLLM_CHUNK_ATTENTION=0 step busy_small_fp8_chunk_off 120 $BUSY_SMALL --quantization fp8 \
  --kv-cache-dtype fp8 --output "$OUT/busy_small_fp8_chunk_off.json"
# Split-KV's default launch against candidates, timed in turns, in a graph of one call and
# of 8 (a step's layers); then end to end: decode steps of random:qwen3-0.6b at batch 1
# over 32k tokens (attention most of a step), the default launch and two others (set
# in-process), twice in turns.
step split_launch_ab 150 $PY benchmarks/split_kv_ab.py --launch 64,4,2,0 64,4,2,1 32,4,3,0 \
  --output "$OUT/split_launch_ab.json"
LONG="-m gridllm.bench.gpu_busy --model random:qwen3-0.6b --batch-size 1 --input-len 32000
  --num-steps 64"
# busy_with SETTINGS [MODULE]: a `python -c` program, gpu_busy (or MODULE) with SETTINGS
# (Python assignments to `m`, the decode attention module, say) made in-process.
busy_with() {
  printf '%s' "import runpy, sys, kernels.paged_decode_attention as m
$1
sys.argv[0] = '${2:-gridllm.bench.gpu_busy}'
runpy.run_module('${2:-gridllm.bench.gpu_busy}', run_name='__main__')"
}
for turn in 1 2; do
  step busy_long$turn 90 $PY $LONG --output "$OUT/busy_long$turn.json"
  step busy_long_64keys$turn 90 $PY -c "$(busy_with \
    "m._SPLIT_LAUNCH, m._SPLIT_PREFETCH = (64, 4, 2, False, None), False")" \
    ${LONG#-m gridllm.bench.gpu_busy} --output "$OUT/busy_long_64keys$turn.json"
  step busy_long_prefetch$turn 90 $PY -c "$(busy_with \
    "m._SPLIT_LAUNCH, m._SPLIT_PREFETCH = (32, 4, 3, False, None), True")" \
    ${LONG#-m gridllm.bench.gpu_busy} --output "$OUT/busy_long_prefetch$turn.json"
done
step launch_host 90 $PY benchmarks/launch_host.py --output "$OUT/launch_host.json"
# Launches straight to the compiled kernels: the chunk kernel's and a mixed step's decode
# GPU tests with them on, then 64-token prompt steps with them and without, twice in turns.
GRIDLLM_DIRECT_LAUNCH=1 step direct_tests 150 $PY -m pytest -q -p no:cacheprovider -rf \
  -m gpu tests/kernels/test_chunk_attention.py \
  tests/kernels/test_paged_decode_attention.py::test_gpu_mixed_step_layers_share_the_decode_launch
# direct_turns NAME CAP CMD...: CMD with direct launches (NAME_direct1) and without
# (NAME_jit1), then again (NAME_direct2, NAME_jit2), each writing $OUT/<step>.json.
direct_turns() {
  local name=$1 cap=$2 turn; shift 2
  for turn in 1 2; do
    GRIDLLM_DIRECT_LAUNCH=1 step ${name}_direct$turn "$cap" "$@" \
      --output "$OUT/${name}_direct$turn.json"
    GRIDLLM_DIRECT_LAUNCH=0 step ${name}_jit$turn "$cap" "$@" \
      --output "$OUT/${name}_jit$turn.json"
  done
}
direct_turns busy_small 120 $BUSY_SMALL
# ... and where the host bounds the step: random:qwen3-0.6b, kernels under half of a
# 64-token step's time.
BUSY_QWEN="$PY -m gridllm.bench.gpu_busy --model random:qwen3-0.6b --batch-size 4
  --input-len 2048 --prompt-chunk 64 --num-steps 24"
direct_turns busy_qwen 120 $BUSY_QWEN
# The same switch in one process: windows of 4 steps in turns, 10 rounds
# (benchmarks/switch_ab.py), then where the host's time goes in those steps (cProfile),
# direct launches on and off.
step direct_ab_qwen 150 $PY benchmarks/switch_ab.py --switch kernels._launch.DIRECT_LAUNCH \
  --model random:qwen3-0.6b --batch-size 4 --input-len 2048 --prompt-chunk 64 --window 4 \
  --rounds 10 --output "$OUT/direct_ab_qwen.json"
GRIDLLM_DIRECT_LAUNCH=1 step busy_qwen_host_direct 150 $BUSY_QWEN --host-profile \
  --output "$OUT/busy_qwen_host_direct.json"
GRIDLLM_DIRECT_LAUNCH=0 step busy_qwen_host_jit 150 $BUSY_QWEN --host-profile \
  --output "$OUT/busy_qwen_host_jit.json"
# With direct launches on by default: the attention kernels' GPU tests and the model's
# parity with transformers (eager, graphs, graphs cut at attention, chunked mixed steps).
step launch_default_tests 200 $PY -m pytest -q -p no:cacheprovider -rf -m gpu \
  tests/kernels/test_launch.py tests/kernels/test_chunk_attention.py \
  tests/kernels/test_paged_decode_attention.py tests/kernels/test_prefill_attention.py
step query_tiles_tests 60 $PY -m pytest -q -p no:cacheprovider -rf \
  tests/kernels/test_prefill_attention.py -k "query_tiles or one_token_requests_get"
# The query-tile kernel against the torch ops, in one process (windows of steps in turns).
step tiles_ab_qwen 150 $PY benchmarks/switch_ab.py --switch kernels.prefill_args.TILES_KERNEL \
  --model random:qwen3-0.6b --batch-size 4 --input-len 2048 --prompt-chunk 64 --window 4 \
  --rounds 10 --output "$OUT/tiles_ab_qwen.json"
# Offline throughput of a small model whose steps (at most 512 tokens: prompt chunks beside
# decodes) the host bounds, direct launches on and off, in turns.
QWEN_MIXED="$PY -m gridllm.bench throughput --model random:qwen3-0.6b --num-prompts 256
  --input-len-range 256:1024 --output-len-range 32:128 --max-num-batched-tokens 512
  --no-roofline --no-tqdm"
direct_turns qwen_mixed 70 $QWEN_MIXED
# The host-bound 64-token steps against another checkout of the code (AB_PREV, a directory
# holding one: `git archive REV | tar -x -C DIR`), in turns.
for turn in 1 2; do
  step busy_qwen_now$turn 120 $BUSY_QWEN --output "$OUT/busy_qwen_now$turn.json"
  if [ -n "${AB_PREV:-}" ]; then
    (cd "$AB_PREV" && PYTHONPATH="$PWD:/tmp/site" step busy_qwen_prev$turn 120 \
      $BUSY_QWEN --output "$OUT/busy_qwen_prev$turn.json")
  fi
done
# Batch-1 decode of random:llama3-8b with FP8 weights and KV cache under torch.profiler,
# each kernel's time in a Chrome trace: with programmatic dependent launch (the default
# on Hopper) and without (a kernel's span then its own run, not its wait).
B1_BF16_ARGS="--model random:llama3-8b --batch-size 1 --input-len 128 --num-steps 32"
B1_ARGS="$B1_BF16_ARGS --quantization fp8 --kv-cache-dtype fp8"
B1_STEPS="$PY -m gridllm.bench.gpu_busy $B1_ARGS"
step busy_b1_fp8 120 $B1_STEPS --trace "$OUT/busy_b1_fp8.trace.json" \
  --output "$OUT/busy_b1_fp8.json"
GRIDLLM_LAUNCH_DEPENDENT=0 step busy_b1_fp8_nopdl 120 $B1_STEPS \
  --trace "$OUT/busy_b1_fp8_nopdl.trace.json" --output "$OUT/busy_b1_fp8_nopdl.json"
# Decode kernels that read the step's inputs before they wait (early reads, on by default):
# the FP8 decode attention's and rotary KV write's GPU tests, then batch-1 FP8 steps with
# them and with GRIDLLM_EARLY_READS=0, twice in turns.
step early_tests 150 $PY -m pytest -q -p no:cacheprovider -rf -m gpu \
  tests/kernels/test_fp8_decode_attention.py tests/kernels/test_rotary_kv_cache_write.py
for turn in 1 2; do
  step b1_now$turn 60 $B1_STEPS --output "$OUT/b1_now$turn.json"
  GRIDLLM_EARLY_READS=0 step b1_early_off$turn 60 $B1_STEPS \
    --output "$OUT/b1_early_off$turn.json"
done
# Short-context split floors, in turns: batch-1 FP8 steps (the one-warp kernel) at 8 keys a
# split at least (served), 16, 32, 64 and 1,024 (one split); bf16 steps (the tl.dot
# kernel) at 16 (served) and 32.
for turn in 1 2; do
  for keys in 8 16 32 64 1024; do
    step b1_split${keys}_$turn 60 $PY -c "$(busy_with \
      "m._MIN_TOKENS_PER_SPLIT_ONE_WARP = $keys")" $B1_ARGS \
      --output "$OUT/b1_split${keys}_$turn.json"
  done
  for keys in 16 32; do
    step b1_bf16_split${keys}_$turn 60 $PY -c "$(busy_with "m._MIN_TOKENS_PER_SPLIT = $keys")" \
      $B1_BF16_ARGS --output "$OUT/b1_bf16_split${keys}_$turn.json"
  done
done
# With early reads on by default: the FP8 layers' GPU tests and the greedy ids against the
# same engine with them off.
step early_e2e_tests 240 $PYTEST -rf tests/worker_svc/test_quantization.py \
  tests/gridllm/test_gpu.py -k "quantization or early_reads"
# The batch-1 e4m3 GEMVs' tiles along K, set per shape in-process (tiles_with TILES: a
# Python dict body {(num_out, num_in): (BLOCK_N, BLOCK_K, num_warps)}; other shapes as
# served). A program requests its first tile before it waits for the kernel before, so a
# tile of the whole row (K = 4,096) puts a projection's weight in flight while attention
# runs. Batch-1 FP8 steps of random:llama3-8b (q/k/v 6144 x 4096, o 4096 x 4096, gate/up
# 28672 x 4096), twice in turns.
tiles_with() {  # TILES [MODULE]
  busy_with "import kernels.gemv as g
served, tiles = g.config_for, {$1}
def config_for(num_out, num_in, weight_bytes=2, fused=False):
    if weight_bytes == 1 and not fused and (num_out, num_in) in tiles:
        return tiles[num_out, num_in] + (1, 0)
    return served(num_out, num_in, weight_bytes, fused)
g.config_for = config_for" "${2:-}"
}
# tiles_step NAME TILES: batch-1 FP8 steps with TILES, into $OUT/NAME.json.
tiles_step() {
  step "$1" 60 $PY -c "$(tiles_with "$2")" $B1_ARGS --output "$OUT/$1.json"
}
# The step's input moves as two kernels (kernels/step_inputs.py) against the torch ops
# they replace (an index, a cast and an index_put; a cast and four device copies): their
# GPU test, then batch-1 FP8 steps of random:llama3-8b and batch-64 decode steps of
# random:qwen3-0.6b (whose host matters more), each way, in turns.
step inputs_tests 60 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_step_inputs.py
TORCH_INPUTS="import kernels.torch_ref as r
import worker_svc.cuda_graph as cg, worker_svc.layers.ops as o
cg.decode_graph_inputs, o.scatter_sampled = r.decode_graph_inputs, r.scatter_sampled"
QWEN_B64="--model random:qwen3-0.6b --batch-size 64 --input-len 128 --num-steps 64"
# Logits converted to float32 before the sampler, as before its argmax and sampling
# kernels took the LM head's bf16 logits as they are (b1_inputs_N and qwen_b64_inputs_N
# are the served way for greedy steps, qwen_b64_draw_N for draws).
F32_LOGITS="import worker_svc.sampler as s
call = s.Sampler.__call__
s.Sampler.__call__ = lambda self, logits, meta: call(self, logits.float(), meta)"
for turn in 1 2 3; do
  step b1_inputs_$turn 60 $B1_STEPS --output "$OUT/b1_inputs_$turn.json"
  step b1_inputs_torch_$turn 60 $PY -c "$(busy_with "$TORCH_INPUTS")" $B1_ARGS \
    --output "$OUT/b1_inputs_torch_$turn.json"
  step qwen_b64_inputs_$turn 60 $PY -m gridllm.bench.gpu_busy $QWEN_B64 \
    --output "$OUT/qwen_b64_inputs_$turn.json"
  step qwen_b64_inputs_torch_$turn 60 $PY -c "$(busy_with "$TORCH_INPUTS")" $QWEN_B64 \
    --output "$OUT/qwen_b64_inputs_torch_$turn.json"
  step b1_f32logits_$turn 60 $PY -c "$(busy_with "$F32_LOGITS")" $B1_ARGS \
    --output "$OUT/b1_f32logits_$turn.json"
  step qwen_b64_f32logits_$turn 60 $PY -c "$(busy_with "$F32_LOGITS")" $QWEN_B64 \
    --output "$OUT/qwen_b64_f32logits_$turn.json"
done
# Qwen3's per-head q/k norms as one in-place kernel over the projection's views
# (ops.qk_rms_norm_) against the two norms of copied views: the kernel's GPU tests, then
# batch-64 decode steps of random:qwen3-0.6b each way, in turns.
step qknorm_tests 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_rms_norm.py
QK_NORM_OFF="import worker_svc.layers.ops as o
o.qk_rms_norm_ = lambda *args: False"
for turn in 1 2; do
  step qwen_b64_qknorm_$turn 60 $PY -m gridllm.bench.gpu_busy $QWEN_B64 \
    --output "$OUT/qwen_b64_qknorm_$turn.json"
  step qwen_b64_qknorm_off_$turn 60 $PY -c "$(busy_with "$QK_NORM_OFF")" $QWEN_B64 \
    --output "$OUT/qwen_b64_qknorm_off_$turn.json"
done
# Rows that draw (temperature 0.8, seeded, top-p 0.95): the sampling kernel's GPU tests
# (16-bit logits draw their float32 copy's tokens among them), then over the LM head's
# bf16 logits against a float32 copy made first, batch-64 decode steps of
# random:qwen3-0.6b, in turns.
step sampling_tests 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_sampling.py
for turn in 1 2; do
  step qwen_b64_draw_$turn 60 $PY -m gridllm.bench.gpu_busy $QWEN_B64 --temperature 0.8 \
    --output "$OUT/qwen_b64_draw_$turn.json"
  step qwen_b64_draw_f32_$turn 60 $PY -c "$(busy_with "$F32_LOGITS")" $QWEN_B64 \
    --temperature 0.8 --output "$OUT/qwen_b64_draw_f32_$turn.json"
done
# The sampling kernels alone, then in drawing steps, against earlier copies of
# kernels/sampling.py (SAMPLING_COMPARE="NAME=FILE ...", e.g. from
# `git show REV:kernels/sampling.py`), in turns.
COMPARE_ARGS=""
for spec in ${SAMPLING_COMPARE:-}; do COMPARE_ARGS="$COMPARE_ARGS --compare $spec"; done
step sampling_bench 240 $PY benchmarks/sampling.py $COMPARE_ARGS \
  --output "$OUT/sampling_bench.json"
step sampling_compile 300 $PY benchmarks/sampling.py --compile $COMPARE_ARGS \
  --output "$OUT/sampling_compile.json"
FIRST_COMPARE=${SAMPLING_COMPARE:-}
FIRST_COMPARE=${FIRST_COMPARE%% *}
PREV_SAMPLING="import importlib.util, inspect, kernels.sampling as s
spec = importlib.util.spec_from_file_location('sampling_prev', '${FIRST_COMPARE#*=}')
prev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prev)
takes = inspect.signature(prev.sample).parameters
s.sample = lambda *a, **k: prev.sample(*a, **{n: v for n, v in k.items() if n in takes})"
# 150 s a step: the first process of a cold machine, and a copy's first (Triton's cache
# keys it by its source), build every sampling variant in the warm-up (an empty cache took
# 78 s on an H100, and 126 s with a copy whose pass kernel built a variant a pass).
for turn in 1 2; do
  step qwen_b64_draw_now_$turn 150 $PY -m gridllm.bench.gpu_busy $QWEN_B64 \
    --temperature 0.8 --output "$OUT/qwen_b64_draw_now_$turn.json"
  if [ -n "$FIRST_COMPARE" ]; then
    step qwen_b64_draw_prev_$turn 150 $PY -c "$(busy_with "$PREV_SAMPLING")" $QWEN_B64 \
      --temperature 0.8 --output "$OUT/qwen_b64_draw_prev_$turn.json"
  fi
done
O4K="(4096, 4096): (2, 4096, 4)"
QKV4K="(6144, 4096): (2, 4096, 4)"
GATE_UP4K="(28672, 4096): (2, 4096, 4)"
for turn in 1 2; do
  step b1_tiles_served_$turn 60 $B1_STEPS --output "$OUT/b1_tiles_served_$turn.json"
  tiles_step b1_tiles_o4k_$turn "$O4K"
  tiles_step b1_tiles_o2k_$turn "(4096, 4096): (2, 2048, 4)"
  tiles_step b1_tiles_oqkv4k_$turn "$O4K, $QKV4K"
  tiles_step b1_tiles_all4k_$turn "$O4K, $QKV4K, $GATE_UP4K"
done
# The two GEMVs furthest from copy bandwidth in a layer (o at ~72%, down at ~85%, H100
# 2026-12-06) at other channel counts and tiles, in the step, twice in turns (against
# b1_tiles_served_N): down as 4 channels by 1,024 on 2 warps, 8 by 512 on 4, 2 by 512 on
# 4; o as 4 by 1,024 on 2 and 4 by 512 on 4.
DOWN="(4096, 14336)"
OPROJ="(4096, 4096)"
for turn in 1 2; do
  tiles_step b1_down_4x1024_$turn "$DOWN: (4, 1024, 2)"
  tiles_step b1_down_8x512_$turn "$DOWN: (8, 512, 4)"
  tiles_step b1_down_2x512_$turn "$DOWN: (2, 512, 4)"
  tiles_step b1_o_4x1024_$turn "$OPROJ: (4, 1024, 2)"
  tiles_step b1_o_4x512_$turn "$OPROJ: (4, 512, 4)"
done
# End to end (gridllm bench latency) with o, and with o, q/k/v and gate/up, whole rows.
step lat_fp8_o4k 90 $PY -c "$(tiles_with "$O4K" gridllm.bench)" ${LAT#*-m gridllm.bench} \
  --output "$OUT/lat_fp8_o4k.json"
step lat_fp8_all4k 90 $PY -c "$(tiles_with "$O4K, $QKV4K, $GATE_UP4K" gridllm.bench)" \
  ${LAT#*-m gridllm.bench} --output "$OUT/lat_fp8_all4k.json"
step parity_tests 300 $PYTEST -rf tests/gridllm/test_gpu.py -k "not structured"
step piecewise_fp8 90 $SMALL --quantization fp8 --kv-cache-dtype fp8 \
  --output "$OUT/piecewise_fp8.json"
GRIDLLM_PIECEWISE_GRAPHS=0 step piecewise_fp8_eager 90 $SMALL --quantization fp8 \
  --kv-cache-dtype fp8 --output "$OUT/piecewise_fp8_eager.json"
echo "results in $OUT" | tee -a "$LOG"
