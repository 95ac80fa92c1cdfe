# Sourced by the GPU scripts of benchmarks/ (run from the repository root): the environment
# they share. Needs PY (the Python to use) and LOG (a file) set; exports PYTHONPATH with the
# checkout and /tmp/site first, quiet logging; installs the wheels carried in .whl/ (what the
# image lacks, see gpu_suite.sh) into /tmp/site; logs the GPU's name and driver.
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export GRIDLLM_LOGGING_LEVEL=${GRIDLLM_LOGGING_LEVEL:-WARNING}
export TOKENIZERS_PARALLELISM=false
: > "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    || echo "WARNING: installing .whl/ failed" | tee -a "$LOG"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
