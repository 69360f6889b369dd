#!/usr/bin/env bash
# The GPU reproduction run, on a bare GPU machine with no network, from a copy of the
# checkout that carries .whl/ and .gpu-data/ (made by benchmarks/gpu_prepare.sh):
#
#     OUT=/some/folder bash benchmarks/gpu_run.sh
#
# 1. omegaconf (and antlr4-python3-runtime) from the wheels in .whl/ into /tmp/site, with
#    pip --no-index; skipped when omegaconf is already importable;
# 2. benchmarks/gpu_cifar.py --data .gpu-data/cifar10-jpeg.npz --out $OUT --budget-s 330,
#    its log tee'd to $OUT/gpu_cifar.log; it writes $OUT/gpu_cifar.json.
#
# Settings (environment): OUT (required), GPU_BUDGET_S (330), GPU_ARGS (more gpu_cifar.py
# arguments, e.g. --tiny), PYTHON (python3). For tests: GPU_WHEELS (.whl), GPU_SITE (/tmp/site),
# GPU_NEED_MODULE (omegaconf), GPU_RUN_STEP=install (stop after the wheel step).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the results}
WHEELS=${GPU_WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/site}
NEED=${GPU_NEED_MODULE:-omegaconf}
export PYTHONUNBUFFERED=1

install_wheels() {
  if "$PY" -c "import $NEED" 2>/dev/null; then
    echo "gpu_run: $NEED is importable; no wheels installed"
    return 0
  fi
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_run: $NEED is missing and $WHEELS/ holds no wheels; run benchmarks/gpu_prepare.sh" \
         "on a machine with pip access and copy $WHEELS here" >&2
    return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "import $NEED"; then
    echo "gpu_run: installed $WHEELS/*.whl into $SITE but still cannot import $NEED" >&2
    return 1
  fi
  echo "gpu_run: installed $(cd "$WHEELS" && echo *.whl) into $SITE"
}

mkdir -p "$OUT"
install_wheels
if [ "${GPU_RUN_STEP:-all}" = install ]; then
  exit 0
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
# shellcheck disable=SC2086  # GPU_ARGS is a list of arguments
"$PY" benchmarks/gpu_cifar.py --data .gpu-data/cifar10-jpeg.npz --out "$OUT" \
  --budget-s "${GPU_BUDGET_S:-330}" ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu_cifar.log"
