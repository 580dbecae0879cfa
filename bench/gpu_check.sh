#!/usr/bin/env bash
# The GPU check of issue #13 (bench/gpu_check.py): run from the repository root on a fresh GPU machine,
#
#     bash bench/gpu_check.sh [OUT]          # default OUT: gpu_check_out
#
# It needs no network when torch is already importable. Python, in this order: $PYTHON if set; the
# current python3 if it imports torch, numpy, SimpleITK and pytest; .venv/bin/python if it does; else
# a new .venv (python3 -m venv --system-site-packages, so a torch installed system-wide is reused) with
# requirements-dev.txt installed by pip (from whatever index or local wheel cache pip is configured for;
# torch is installed only when it is still missing). All sections together: <= 8 minutes on one
# H100/H200 (budget 450 s, each section capped, see bench/gpu_check.py). Writes OUT/gpu_check.json and
# OUT/gpu_check.md; exit code 1 when a section failed or ran over its cap.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${1:-gpu_check_out}"
NEEDS="import torch, numpy, SimpleITK, pytest"

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif python3 -c "$NEEDS" 2>/dev/null; then
    PY=python3
elif [ -x .venv/bin/python ] && .venv/bin/python -c "$NEEDS" 2>/dev/null; then
    PY=.venv/bin/python
else
    echo "gpu_check: no python with torch + the requirements; making .venv" >&2
    [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv || exit 2
    PY=.venv/bin/python
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install torch torchvision || exit 2
    fi
    "$PY" -m pip install -r requirements-dev.txt || "$PY" -m pip install -r requirements.txt pytest || exit 2
fi
echo "gpu_check: $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__,
  "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")')" >&2
# the sections stop themselves within the budget; the outer timeout is a last resort (8.5 min)
exec timeout -k 10 510 "$PY" -m bench.gpu_check --out "$OUT" --budget-s "${GPU_CHECK_BUDGET_S:-450}"
