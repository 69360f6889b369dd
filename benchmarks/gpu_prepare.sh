#!/usr/bin/env bash
# Prepare the GPU reproduction run on a machine with pip access, for a GPU machine without network access:
#
#     bash benchmarks/gpu_prepare.sh
#
# - .whl/: the wheels the bare GPU machine lacks: omegaconf 2.3.0 (a py3-none-any wheel from the
#   index) and antlr4-python3-runtime 4.9.3 (omegaconf 2.3 needs 4.9.*, published as an sdist only:
#   built here into a py3-none-any wheel with `pip wheel --no-deps`). PyYAML, omegaconf's other
#   need, is usually installed on a GPU image; GPU_WITH_PYYAML=1 adds a
#   cp312 wheel anyway.
# - .gpu-data/cifar10-jpeg.npz: a copy of the CIFAR-10 JPEG pack, inside the checkout.
# Both folders are ignored by git (.gitignore) and are copied to the GPU machine with the checkout.
# The script checks that the copy (tracked and untracked-not-ignored files + both folders) stays
# under 64 MiB, then prints the command to run there.
#
# Settings (environment): PYTHON (python3; needs pip), CIFAR_PACK (default: shared/data/cifar10/
# beside the main checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OMEGACONF=2.3.0
ANTLR=4.9.3
PYYAML=6.0.2
LIMIT=$((64 * 1024 * 1024))

common=$(dirname "$(git rev-parse --path-format=absolute --git-common-dir)")  # the main checkout
PACK=${CIFAR_PACK:-}
if [ -z "$PACK" ]; then
  for candidate in ../shared/data/cifar10/cifar10-jpeg.npz "$common/../shared/data/cifar10/cifar10-jpeg.npz"; do
    if [ -f "$candidate" ]; then PACK=$candidate; break; fi
  done
fi
if [ -z "$PACK" ] || [ ! -f "$PACK" ]; then
  echo "gpu_prepare: CIFAR-10 pack not found (set CIFAR_PACK=/path/to/cifar10-jpeg.npz)" >&2
  exit 1
fi

mkdir -p .whl .gpu-data
rm -f .whl/*.whl  # one version of each: two stop the install on the GPU machine
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "omegaconf==$OMEGACONF"
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$ANTLR"
if [ "${GPU_WITH_PYYAML:-0}" = 1 ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "PyYAML==$PYYAML"
fi
for wheel in .whl/*.whl; do
  case "$wheel" in
    *-py3-none-any.whl|*-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "gpu_prepare: $wheel will not install on the GPU machine (Python 3.12, x86-64)" >&2; exit 1 ;;
  esac
done
if ! cmp -s "$PACK" .gpu-data/cifar10-jpeg.npz; then
  cp "$PACK" .gpu-data/cifar10-jpeg.npz
fi
for folder in .whl .gpu-data; do
  if ! git check-ignore -q "$folder/x"; then
    echo "gpu_prepare: $folder/ is not ignored by git; add it to .gitignore" >&2
    exit 1
  fi
done

tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry_bytes=$(find .whl .gpu-data -type f -exec stat -c %s {} + | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + carry_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_prepare: wheels: $(cd .whl && echo *.whl)"
echo "gpu_prepare: the copy for the GPU machine: working tree $(mib "$tree_bytes") + .whl and .gpu-data $(mib "$carry_bytes")" \
     "= $(mib "$total") of $(mib "$LIMIT")"
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_prepare: the copy is over 64 MiB; remove large untracked files first" >&2
  exit 1
fi
cat <<CALL

On the GPU machine, from a copy of this checkout with .whl and .gpu-data:
  command:   bash benchmarks/gpu_run.sh
  copy also: .whl and .gpu-data (ignored by git)
  time limit: 420 s (the run takes about 6 minutes)
Results come back in \$OUT: gpu_cifar.json, gpu_cifar.log, byol_metrics.jsonl.
CALL
