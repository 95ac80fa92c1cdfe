# Sourced by the GPU scripts of benchmarks/ (run from the repository root): the environment
# they share. Needs PY (the Python to use) and LOG (a file) set; exports PYTHONPATH with the
# checkout and /tmp/site first, quiet logging; installs the wheels carried in .whl/ (what the
# image lacks, see gpu_suite.sh) into /tmp/site; logs the GPU's name and driver; defines
# timed_step, the scripts' steps.
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export GRIDLLM_LOGGING_LEVEL=${GRIDLLM_LOGGING_LEVEL:-WARNING}
export TOKENIZERS_PARALLELISM=false
: > "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    || echo "WARNING: installing .whl/ failed" | tee -a "$LOG"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# timed_step NAME CAP_S CMD...: CMD with a timeout of min(CAP_S, what is left of BUDGET
# seconds since START), its output in $STEP_DIR/NAME.log, the last STEP_TAIL bytes of it
# and a line with its status and time in $LOG (the line in STEP_STATUS too, a file, where
# set). Skipped with status 1 where STEP_SELECT (step names) is set and leaves NAME out, or
# under 20 s are left (said in $LOG); else the command's exit status.
timed_step() {
  local name=$1 cap=$2; shift 2
  if [ -n "${STEP_SELECT:-}" ] && [[ " $STEP_SELECT " != *" $name "* ]]; then
    return 1
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "SKIP $name (only ${left}s of the budget left)" | tee -a "$LOG" ${STEP_STATUS:-}
    return 1
  fi
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  timeout -k 15 "$limit" "$@" >"$STEP_DIR/$name.log" 2>&1
  local rc=$?
  tail -c "${STEP_TAIL:-4000}" "$STEP_DIR/$name.log" >>"$LOG"
  echo "$name rc=$rc $(($(date +%s) - t0))s" | tee -a "$LOG" ${STEP_STATUS:-}
  return $rc
}
