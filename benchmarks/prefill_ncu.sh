#!/usr/bin/env bash
# Nsight Compute's full set of sections over one launch of the served prefill attention
# kernel (64 x 256 and 4 x 4096 causal bf16, cache blocks of 16), of torch's SDPA (64 x
# 256) and of the Gluon kernel storing half sectors (64 x 256), from
# benchmarks/prefill_profile.py; clocks left alone (METHOD.md). Needs PY and
# OUT set (gpu_open_figures.sh's prefill_ncu step); writes $OUT/ncu_<kernel>_<shape>.txt
# (the details page), the Gluon kernel's per-instruction counters as
# $OUT/ncu_<kernel>_<shape>_sass.csv.gz, and the reports ($OUT/*.ncu-rep). NCU_ONLY="served
# half_sectors" profiles only the launches of those names (served, sdpa, half_sectors).
set -u
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
if [ -z "$NCU" ]; then
  echo "no ncu on this machine"
  exit 1
fi
"$NCU" --version | tail -1
rc=0
profile() {  # profile NAME SHAPE ONLY KERNEL_REGEX [prefill_profile.py's --alt ...]
  case " ${NCU_ONLY:-$1} " in *" $1 "*) ;; *) return ;; esac
  local rep="$OUT/ncu_$1_$2"
  "$NCU" --clock-control none --set full --import-source no -k "regex:$4" --launch-skip 1 \
    --launch-count 1 -f -o "$rep" $PY benchmarks/prefill_profile.py --shape "$2" --only "$3" \
    "${@:5}" || { rc=1; return; }
  "$NCU" -i "$rep.ncu-rep" --page details > "$rep.txt" 2>&1 || rc=1
  grep -E "^  [A-Za-z_]|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Registers|Achieved|Issued|No Eligible|Warp Cycles|L2 Hit|Compression Input|Shared Memory Configuration" \
    "$rep.txt" | head -60
  if [ "$3" = served ]; then
    "$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass 2>&1 \
      | gzip > "${rep}_sass.csv.gz" || rc=1
  fi
}
profile served 64x256 served gluon_prefill_attention
profile sdpa 64x256 sdpa "flash|fmha|sdpa|attention"
profile served 4x4096 served gluon_prefill_attention
# The output stored from the accumulator's layout, half sectors a write (served: whole
# sectors, WHOLE_SECTORS), at the short prompts.
profile half_sectors 64x256 served gluon_prefill_attention --alt whole_sectors=0
exit $rc
